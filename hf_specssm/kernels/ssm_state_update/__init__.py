"""N-step selective state update, the commit step of Activation Replay (see README.md in this folder)."""

from hf_specssm.kernels.ssm_state_update.dispatch import selective_state_update_nstep

__all__ = ["selective_state_update_nstep"]
