"""hf_specssm/training."""
