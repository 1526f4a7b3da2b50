"""`hf-specssm-demo`: serve the demo page (on 127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import argparse
import os
from collections.abc import MutableMapping


def configure_environment(environ: MutableMapping[str, str] = os.environ) -> None:
    """Settings to make before Gradio and transformers are imported.

    Gradio's usage analytics are off everywhere. On a Hugging Face Space (`SPACE_ID` is set) the Hub is
    reachable and left alone; elsewhere the demo reads only local models, so `HF_HUB_OFFLINE=1` keeps
    transformers from reaching for the network (unless the environment already says otherwise).
    """
    environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "SPACE_ID" not in environ:
        environ.setdefault("HF_HUB_OFFLINE", "1")


def build_parser() -> argparse.ArgumentParser:
    """Options of `hf-specssm-demo` (each help ends with its default)."""
    parser = argparse.ArgumentParser(
        prog="hf-specssm-demo", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes the demo to the network)",
    )
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument(
        "--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads for decoding"
    )
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="dtype of the real models; auto: this machine's fastest for the target alone (bf16 with AMX or "
        "AVX512-BF16 or on a GPU, fp32 on AVX2-only CPUs); the toy pair is always fp32",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `hf-specssm-demo` console script."""
    args = build_parser().parse_args(argv)
    configure_environment()
    import torch

    from .app import build_app, launch
    from .catalog import Catalog

    torch.set_num_threads(args.threads)
    catalog = Catalog(dtype=args.dtype)
    print(f"Real models load in {catalog.dtype_choice().describe()}.", flush=True)
    launch(build_app(catalog), host=args.host, port=args.port)
    return 0
