"""hf_specssm/tools."""
