"""Batched state fork / gather along the batch axis (see README.md in this folder)."""

from hf_specssm.kernels.state_gather.dispatch import gather_rows

__all__ = ["gather_rows"]
