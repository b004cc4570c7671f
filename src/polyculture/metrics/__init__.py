"""Diversity metrics: lexical (distinct-n, compression, self-BLEU), semantic (VS diversity, Vendi), attribute, calibration,
conceptual (internal vs population variability) and monoculture (dispersion against a reference)."""
