"""Hugging Face Space entry point: the hf_specssm demo (see docs/demo.md, "As a Hugging Face Space").

Spaces run `python app.py` from the root of the Space's repository, which holds this file, the
`hf_specssm` and `hf_specssm_demo` packages, `checkpoints/`, `requirements.txt` and the Space's own card
(`space/README.md`, copied there as `README.md` by `make space`). Locally, prefer the `hf-specssm-demo`
console script.
"""

import os

from hf_specssm_demo.cli import configure_environment

# Before Gradio and transformers are imported: no usage analytics; the Hub stays reachable on a Space.
configure_environment()

from hf_specssm_demo.app import build_app, launch  # noqa: E402 - after the environment is set
from hf_specssm_demo.catalog import Catalog  # noqa: E402

catalog = Catalog()
print(f"Real models load in {catalog.dtype_choice().describe()}.", flush=True)
demo = build_app(catalog)

if __name__ == "__main__":
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0; anywhere else the demo stays on this machine.
    launch(demo, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
