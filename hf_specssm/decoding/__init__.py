"""hf_specssm/decoding."""
