"""Diffuse fine-tuning and the model probe (issue 4)."""
