"""Hugging Face PyTorch <-> cca_jax weight mapping and checkpoint I/O."""
