"""Hugging Face Space entry point: the hf_specssm demo (see docs/demo.md).

Spaces run `python app.py` from the repository root, so `hf_specssm_demo/` imports from the checkout.
Locally, prefer the `hf-specssm-demo` console script.
"""

import os

# Before Gradio is imported: no usage analytics, and no model hub (the demo only reads local models).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from hf_specssm_demo.app import build_app, launch

demo = build_app()

if __name__ == "__main__":
    # Spaces set GRADIO_SERVER_NAME=0.0.0.0; anywhere else the demo stays on this machine.
    launch(demo, host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
