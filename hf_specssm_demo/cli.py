"""`hf-specssm-demo`: serve the demo page (on 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import argparse
import os


def build_parser() -> argparse.ArgumentParser:
    """Options of `hf-specssm-demo`."""
    parser = argparse.ArgumentParser(prog="hf-specssm-demo", description=__doc__)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes the demo to the network)",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads for decoding"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-specssm-demo` console script."""
    args = build_parser().parse_args(argv)
    # Before Gradio is imported: no usage analytics, and no model hub (the demo only reads local models).
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    from .app import build_app, launch

    torch.set_num_threads(args.threads)
    launch(build_app(), host=args.host, port=args.port)
    return 0
