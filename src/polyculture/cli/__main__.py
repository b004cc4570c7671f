"""`python -m polyculture.cli`: the same command line as the `polyculture` script."""

from polyculture.cli import app

if __name__ == "__main__":
    app()
