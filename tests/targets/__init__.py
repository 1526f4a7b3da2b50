"""Targets: SSM and hybrid verification, the tree scan, ragged batches, hidden states, fallbacks."""
