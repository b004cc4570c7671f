"""Diffuse fine-tuning (LoRA on a distribution of valid answers) and the model probe of mode collapse."""
