"""What the model cache's bf16 rounding costs (`hf-specssm cache-accuracy`).

`hf-specssm fetch` stores the converted weights in bf16 (half the disk of fp32). An fp32 run widens them
exactly, so it runs the bf16-rounded model, not the GGUF's own fp32 dequantization. This command measures
the difference on text the model answers: both models, in fp32, read the same chats teacher-forced, and
for every answer position we compare their next-token distributions —

- top-1 agreement: the share of positions where both pick the same greedy token;
- KL(reference ‖ cache) in nats, mean and 99th percentile, and the largest absolute logit difference;
- greedy horizon: along each chat, the position where each model's greedy token first departs from the
  chat's text. For chats the cache model answered greedily itself (the committed distillation pack), the
  reference's first departure is where the two models' free-running greedy answers part; the cache model's
  own departures measure the noise floor (batched vs single-row arithmetic).

The reference is the GGUF loaded by transformers (every tensor dequantized to fp32); the cache model is the
converted folder loaded with `dtype=torch.float32`. `--compute-dtype bf16` runs the cache model in bf16
instead (what a bf16 run computes; slow where bf16 is emulated).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hf_specssm.tools.fetch import CONVERTED_DIRNAME, MODELS, default_cache_dir, get_spec

#: the committed distillation pack (the 1.5B target's greedy answers), when running from a checkout
DEFAULT_ANSWERS = Path(__file__).resolve().parents[2] / "data" / "distilled" / "qwen2.5-coder-1.5b-instruct"


@dataclass
class ChatComparison:
    """One chat read by both models.

    Attributes:
        positions: answer positions compared.
        agree: positions where both models' greedy tokens are equal.
        kl: KL(reference ‖ cache) per position, in nats.
        max_logit_diff: the largest |reference − cache| logit over the chat.
        reference_departs: first answer position where the reference's greedy token is not the chat's
            token (`positions` when it never departs).
        cache_departs: the same for the cache model.
    """

    positions: int
    agree: int
    kl: list[float]
    max_logit_diff: float
    reference_departs: int
    cache_departs: int


@dataclass
class RoundingReport:
    """The comparison over all chats (see the module docstring for each figure)."""

    model: str
    compute_dtype: str
    chats: int
    positions: int
    top1_agreement: float
    mean_kl: float
    p99_kl: float
    max_logit_diff: float
    chats_where_reference_departs_first: int
    chats_where_cache_departs_first: int
    mean_reference_horizon: float
    mean_cache_horizon: float
    seconds: float
    per_chat: list[ChatComparison] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the terminal and the docs."""
        return (
            f"{self.model}: {self.chats} chats, {self.positions} answer positions, cache model in "
            f"{self.compute_dtype}\n"
            f"  top-1 agreement with the fp32 GGUF: {self.top1_agreement:.4f} "
            f"({self.positions - round(self.top1_agreement * self.positions)} positions differ)\n"
            f"  KL(reference ‖ cache): mean {self.mean_kl:.2e}, p99 {self.p99_kl:.2e} nats; "
            f"largest logit difference {self.max_logit_diff:.3f}\n"
            f"  greedy horizon along the chats (first departure from the text, mean over chats): "
            f"reference {self.mean_reference_horizon:.1f}, cache {self.mean_cache_horizon:.1f} tokens; "
            f"the reference departs first in {self.chats_where_reference_departs_first} chats, the cache "
            f"model in {self.chats_where_cache_departs_first}\n"
            f"  {self.seconds:.0f} s"
        )


def _first_departure(predicted: torch.Tensor, text: torch.Tensor) -> int:
    """Index of the first position where `predicted` [T] differs from `text` [T]; T when none does."""
    wrong = (predicted != text).nonzero()
    return int(wrong[0, 0]) if len(wrong) else int(text.numel())


@torch.inference_mode()
def compare_chat(
    reference: torch.nn.Module, candidate: torch.nn.Module, input_ids: list[int], prompt_length: int
) -> ChatComparison:
    """Read one chat with both models and compare their next-token distributions over its answer.

    Args:
        reference, candidate: causal LMs on the same device.
        input_ids: the chat's tokens, prompt then answer ([T]).
        prompt_length: how many of them are the prompt (≥ 1).
    """
    ids = torch.tensor([input_ids], device=next(reference.parameters()).device)
    answer = ids[0, prompt_length:]
    # position t predicts token t + 1: the answer's tokens are predicted from prompt_length - 1 on
    keep = slice(prompt_length - 1, ids.shape[1] - 1)
    ref_logits = reference(ids).logits[0, keep].float()
    cand_logits = candidate(ids).logits[0, keep].float()
    ref_logp, cand_logp = ref_logits.log_softmax(-1), cand_logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1).clamp_min(0.0)
    ref_top, cand_top = ref_logits.argmax(-1), cand_logits.argmax(-1)
    return ChatComparison(
        positions=int(answer.numel()),
        agree=int((ref_top == cand_top).sum()),
        kl=kl.tolist(),
        max_logit_diff=float((ref_logits - cand_logits).abs().max()),
        reference_departs=_first_departure(ref_top, answer),
        cache_departs=_first_departure(cand_top, answer),
    )


def summarize(model: str, compute_dtype: str, chats: list[ChatComparison], seconds: float) -> RoundingReport:
    """Fold per-chat comparisons into one report."""
    if not chats:
        raise ValueError("no chats to summarize: pass --answers with at least one answered chat")
    kls = torch.tensor([value for chat in chats for value in chat.kl], dtype=torch.float64)
    positions = sum(chat.positions for chat in chats)
    return RoundingReport(
        model=model,
        compute_dtype=compute_dtype,
        chats=len(chats),
        positions=positions,
        top1_agreement=sum(chat.agree for chat in chats) / positions,
        mean_kl=float(kls.mean()),
        p99_kl=float(kls.quantile(0.99)) if kls.numel() > 1 else float(kls.max()),
        max_logit_diff=max(chat.max_logit_diff for chat in chats),
        chats_where_reference_departs_first=sum(c.reference_departs < c.cache_departs for c in chats),
        chats_where_cache_departs_first=sum(c.cache_departs < c.reference_departs for c in chats),
        mean_reference_horizon=sum(c.reference_departs for c in chats) / len(chats),
        mean_cache_horizon=sum(c.cache_departs for c in chats) / len(chats),
        seconds=seconds,
        per_chat=chats,
    )


def select_chats(records, limit: int, max_answer_tokens: int) -> list[tuple[list[int], int]]:
    """The first `limit` chats with an answer, each cut to its prompt and `max_answer_tokens` answer tokens.

    Args:
        records: dicts with `input_ids` and `prompt_length` (a distillation store, pack or JSONL).
    """
    chats = []
    for record in records:
        prompt_length = int(record["prompt_length"])
        ids = list(record["input_ids"])[: prompt_length + max_answer_tokens]
        if prompt_length >= 1 and len(ids) > prompt_length:
            chats.append((ids, prompt_length))
        if len(chats) == limit:
            break
    return chats


def load_pair(model_dir: Path, gguf_filename: str, compute_dtype: torch.dtype):
    """(reference, cache model): the GGUF dequantized to fp32, and the converted folder in `compute_dtype`."""
    from transformers import AutoModelForCausalLM

    converted = model_dir / CONVERTED_DIRNAME
    if not (model_dir / gguf_filename).is_file() or not converted.is_dir():
        raise FileNotFoundError(
            f"{model_dir} lacks the GGUF or its converted folder: run `hf-specssm fetch {model_dir.name}` "
            "first (and keep the GGUF)"
        )
    reference = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf_filename, dtype=torch.float32)
    candidate = AutoModelForCausalLM.from_pretrained(converted, dtype=compute_dtype)
    return reference.eval(), candidate.eval()


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `cache-accuracy` options."""
    parser.add_argument("name", choices=sorted(MODELS), help="a fetched model (`hf-specssm fetch NAME`)")
    parser.add_argument(
        "--answers",
        type=Path,
        default=DEFAULT_ANSWERS,
        help="chats to read: a distillation pack, store or JSONL (default: the committed pack of the "
        "1.5B target's greedy answers)",
    )
    parser.add_argument("--limit", type=int, default=16, help="chats to read")
    parser.add_argument("--max-answer-tokens", type=int, default=128, help="answer tokens read per chat")
    parser.add_argument(
        "--compute-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="dtype the cache model runs in (the reference always runs in fp32)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="model cache (default: as `fetch`)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Raise `ValueError` / `FileNotFoundError` for arguments that cannot work, before any model loads."""
    for name in ("limit", "max_answer_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1; got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be ≥ 1; got {args.threads}")
    if not args.answers.exists():
        raise FileNotFoundError(
            f"--answers {args.answers} does not exist: pass a distillation pack, store or JSONL "
            "(`hf-specssm distill generate` / `distill pack`)"
        )


def run(args: argparse.Namespace) -> int:
    """Carry out `hf-specssm cache-accuracy`; prints the report (and writes it with --out)."""
    from hf_specssm.training.mamba_drafter.data import read_answers

    check_arguments(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    spec = get_spec(args.name)
    chats = select_chats(read_answers(args.answers), args.limit, args.max_answer_tokens)
    if not chats:
        raise ValueError(f"--answers {args.answers} holds no chat with an answer")
    model_dir = (args.cache_dir if args.cache_dir is not None else default_cache_dir()) / spec.name
    compute_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.compute_dtype]
    print(
        f"Loading {spec.name}: the GGUF dequantized to fp32 (reference) and the converted cache…", flush=True
    )
    reference, candidate = load_pair(model_dir, spec.gguf_filename, compute_dtype)
    started, compared = time.perf_counter(), []
    for index, (ids, prompt_length) in enumerate(chats):
        compared.append(compare_chat(reference, candidate, ids, prompt_length))
        print(
            f"  chat {index + 1}/{len(chats)}: {compared[-1].positions} answer tokens, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
    report = summarize(spec.name, args.compute_dtype, compared, time.perf_counter() - started)
    print(report.summary())
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        staging = args.out.with_name(args.out.name + ".partial")
        staging.write_text(json.dumps(asdict(report), indent=1, allow_nan=False) + "\n")
        staging.replace(args.out)
    return 0 if math.isfinite(report.mean_kl) else 1


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_specssm.tools.cache_accuracy NAME …`."""
    parser = add_arguments(argparse.ArgumentParser(prog="hf-specssm cache-accuracy", description=__doc__))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
