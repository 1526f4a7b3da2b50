"""The benchmark harness (`hf-specssm bench`): methods × prompt sets × modes, JSONL rows, tables, plots."""
