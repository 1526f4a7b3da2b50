"""hf_specssm/training/redrafter."""
