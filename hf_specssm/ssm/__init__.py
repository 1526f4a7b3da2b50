"""hf_specssm/ssm."""
