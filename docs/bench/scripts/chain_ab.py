"""The fc drafter's chain end to end on the real pair, variants side by side in one process (bf16, greedy,
128 new tokens, the first 2 prompts of each set), each against the target alone's rows.

- `lengths`: the adaptive length (default) vs constant chains of 6 (rows in artifacts/bench-k6/);
- `lean`: both, with the drafter stepping through transformers' one-token functions and through
  `hf_specssm.lean_steps` (the default; rows in artifacts/bench-lean/).

Run from the repository root, e.g. `.venv/bin/python docs/bench/scripts/chain_ab.py lean`; rows resume;
docs/benchmarks.md records the results.
"""

import argparse
from pathlib import Path

import torch

from hf_specssm.drafters.feature import FeatureDrafter
from hf_specssm.tools.bench import command
from hf_specssm.tools.bench.harness import BenchContext, run_benchmark
from hf_specssm.tools.bench.methods import GenerationSettings, ours, target_alone
from hf_specssm.tools.bench.prompt_sets import load_prompt_set
from hf_specssm.tools.bench.report import markdown_tables, summarize

OUT = {"lengths": Path("artifacts/bench-k6"), "lean": Path("artifacts/bench-lean")}
SETTINGS = [
    "--dtype", "bf16", "--mamba-dtype", "bf16", "--small-drafter", "none",
    "--mamba-drafter", "checkpoints/mamba2-qwen2.5-coder-fc", "--methods", "ours-mamba",
]  # fmt: skip


def drafter(model, constant: bool, lean: bool) -> FeatureDrafter:
    """The fc drafter's chain: adaptive or constant chains of 6, lean or transformers' one-token steps."""
    options = {"num_draft_tokens": 6, "schedule": "constant"} if constant else {}
    chain = FeatureDrafter(model, **options)
    if not lean:
        chain._lean_mixers = []  # the drafter's one-token steps through transformers' functions
    return chain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("compare", choices=sorted(OUT))
    compare = parser.parse_args().compare
    args = command.add_arguments(argparse.ArgumentParser()).parse_args(SETTINGS)
    torch.set_num_threads(2)
    choice = command._run_dtype(args, torch.device("cpu"))
    models = command.load_models(args, choice)
    target, model = models.target, models.mamba
    variants = [("", True)] if compare == "lengths" else [("-stock", False), ("", True)]
    methods = [target_alone(target)]
    for constant, name, label in (
        (False, "ours-mamba", "adaptive chain"),
        (True, "ours-mamba-k6", "chains of 6"),
    ):
        for suffix, lean in variants:
            steps = "lean steps" if lean else "transformers steps"
            methods.append(
                ours(target, name + suffix, f"{label}, {steps}", drafter(model, constant, lean), model)
            )
    prompts = [
        p for name in ("humaneval", "gsm8k", "mt_bench", "cnn_dm") for p in load_prompt_set(name, limit=2)
    ]
    OUT[compare].mkdir(parents=True, exist_ok=True)
    context = BenchContext(target=models.name, dtype=choice.name, device=command.device_label(target.device))
    rows = run_benchmark(
        target, models.tokenize, methods, prompts, [GenerationSettings(128)],
        str(OUT[compare] / "results.jsonl"), context, progress=False,
    )  # fmt: skip
    table = markdown_tables(summarize(rows), [method.name for method in methods])
    (OUT[compare] / "summary.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
