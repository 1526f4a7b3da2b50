"""hf_specssm/targets."""
