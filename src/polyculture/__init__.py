"""polyculture: diverse synthetic datasets from language models."""
__version__ = "0.1.0"
