"""hf_specssm/policies."""
