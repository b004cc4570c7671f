"""Engines behind one small interface (base.Engine); model_files.py resolves model names to local folders, offline."""
