"""Write a trained ReDrafter head as the shipped folder `checkpoints/redrafter-qwen2.5-coder` (Hub format).

The head keeps its weights (bf16), draft vocabulary and simulated τ; the script records what a Hub user
needs in its config and card: the target as a Hub id, the training data without this machine's paths, and
the default drafting measured fastest on CPUs (one beam: chains of `beam_length` tokens; pass
`ReDrafterDrafter(head, target, beam_width=4)` for beam trees). The folder is replaced crash-safe.

Run from the repository root:
`.venv/bin/python docs/bench/scripts/ship_head.py artifacts/finetune/redrafter-store-1500`
(a head continued from the shipped one with `train-redrafter --init`: pass `--training-data` and
`--training-steps` to describe all of its training, not only the last run's)
"""

import argparse
import json
from pathlib import Path

import torch

from hf_specssm.drafters.redrafter import ReDrafterHead
from hf_specssm.shipped import REDRAFTER_HEAD
from hf_specssm.training.checkpoints import replace_folder

TARGET = "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("head", help="the trained head's folder (`hf-specssm train-redrafter --store`)")
    parser.add_argument("--out", default=f"checkpoints/{REDRAFTER_HEAD}")
    parser.add_argument("--beam-width", type=int, default=1, help="the head's default beams when drafting")
    parser.add_argument(
        "--training-data", help="the card's training data (default: the first shipped head's)"
    )
    parser.add_argument("--training-steps", type=int, help="steps in all (default: the run's own)")
    args = parser.parse_args()
    head = ReDrafterHead.from_pretrained(args.head, dtype=torch.bfloat16).eval()
    config = head.config
    tokens = json.loads((Path(args.head) / "run.json").read_text()).get("fingerprint", {})
    config.target_name = TARGET
    config.beam_width = args.beam_width
    config.training_steps = args.training_steps or config.training_steps
    config.training_data = args.training_data or (
        "the target's own answers (greedy and T = 0.7 samples; 269,765 answer tokens in 1,719 chats) to "
        "instructions built offline (code, math word problems, open chat, brainstorming, articles, summaries, "
        "news digests, translation, questions answered from a given passage, multi-turn follow-ups, "
        "self-instruct; no benchmark prompts), with the target's hidden states and top-k soft labels (`hf-specssm distill`), "
        f"{config.training_steps} steps of {tokens.get('--batch-size', 512)} rows"
    )
    replace_folder(args.out, head.save_pretrained)
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB, simulated τ {config.simulated_tau:.2f}")


if __name__ == "__main__":
    main()
