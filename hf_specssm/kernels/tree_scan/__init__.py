"""Tree scans: SSM outputs at every node of a token tree in one pass (see README.md in this folder)."""

from hf_specssm.kernels.tree_scan.dispatch import tree_scan, tree_scan_diagonal

__all__ = ["tree_scan", "tree_scan_diagonal"]
