"""hf_specssm/testing."""
