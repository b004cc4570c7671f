"""Engines behind one small interface (base.Engine); models.py resolves embedded models offline."""
