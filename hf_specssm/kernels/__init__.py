"""Hot-path ops for hf_specssm, imported as `hf_specssm.kernels`.

Each op lives in its own folder with a plain-torch reference, a Triton kernel and one public dispatching
function. The package works without Triton and without a GPU: the references are used there. (The tree
scans are imported from `hf_specssm.kernels.tree_scan`: re-exporting the `tree_scan` function here would
hide the subpackage of the same name.) `hf_specssm.kernels.cpu` holds compiled CPU kernels for the short
scans of a verification, built with the machine's C++ compiler at first use (README.md there).
"""

from hf_specssm.kernels.ssm_state_update import selective_state_update_nstep
from hf_specssm.kernels.state_gather import gather_rows

__all__ = ["gather_rows", "selective_state_update_nstep"]
