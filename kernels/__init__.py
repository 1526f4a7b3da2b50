"""Hot-path ops for hf_specssm, imported as `hf_specssm_kernels`.

Each op lives in its own folder with a plain-torch reference and one public dispatching function. The
package works without Triton and without a GPU: the references are used there.
"""

from hf_specssm_kernels.state_gather import gather_rows

__all__ = ["gather_rows"]
