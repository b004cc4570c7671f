"""Diversity metrics: lexical, semantic and attribute-level."""
