"""Teacher-forced agreement of each drafter with the target, on the target's greedy answers of a bench run.

For every prompt the target alone answered greedily, the prompt and that answer go once through each
drafter (teacher forcing). Its greedy prediction at each answer position is compared with the target's
next token: the share of hits is the drafter's **top-1 agreement**, and the same table simulates greedy
chains of `k` drafts started at every position (`ChainTally`: τ and the acceptance rate by draft
position, as `hf-specssm finetune-drafter evaluate` reports them). A causal LM conditioned on the true
prefix predicts what a chain drafts, so the simulation is exact for any drafter that reads only tokens;
a feature-conditioned Mamba drafter (`reads_target_hidden`) also reads the target's last hidden state at
each round's start, taken here from one teacher-forced pass of the target.

Unlike speed, these numbers do not depend on the machine's load, and unlike the bench's own τ they do
not depend on a drafter's stopping rule or draft-length schedule.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hf_specssm.training.distillation.generate import GREEDY
from hf_specssm.training.mamba_drafter.finetune import ChainEstimate, ChainTally, Example, evaluate_drafter

#: chain length of the simulated τ (as `finetune-drafter evaluate`'s default)
AGREEMENT_K = 6


@dataclass(frozen=True)
class Agreement:
    """One drafter's teacher-forced agreement with the target on one prompt set.

    Attributes:
        set: the prompt set.
        drafter: the drafter's label (`"0.5b"`, `"mamba"`).
        prompts: answers scored.
        estimate: top-1 agreement, simulated τ and acceptance by position for chains of `estimate.k`.
    """

    set: str
    drafter: str
    prompts: int
    estimate: ChainEstimate


def answer_examples(
    target: torch.nn.Module,
    answers: Iterable[tuple[str, torch.Tensor, Sequence[int]]],
    with_hidden: bool,
) -> list[Example]:
    """The target's greedy answers as `Example`s (hidden states from one teacher-forced pass each).

    Args:
        target: the target model (its base model's output is the last hidden state drafts are fed).
        answers: `(set, prompt_ids [1, P], answer_ids)` per answer.
        with_hidden: fill `Example.hidden` `[A, H]`: the target's hidden state at the position whose logits
            chose each answer token (what the decoding loop hands a feature-conditioned drafter).
    """
    examples = []
    base = getattr(target, target.base_model_prefix)
    for prompt_set, prompt_ids, answer in answers:
        prompt_ids = prompt_ids.reshape(-1).cpu()
        ids = torch.cat([prompt_ids, torch.tensor(list(answer), dtype=torch.long)])
        hidden = None
        if with_hidden and len(answer):
            device = next(target.parameters()).device
            with torch.no_grad():
                states = base(input_ids=ids[None].to(device), use_cache=False).last_hidden_state[0]
            hidden = states[prompt_ids.numel() - 1 : ids.numel() - 1].cpu()
        empty = torch.zeros(len(answer), 0)
        examples.append(
            Example(ids, prompt_ids.numel(), GREEDY, empty.long(), empty, hidden, domain=prompt_set)
        )
    return examples


@torch.no_grad()
def token_drafter_estimate(drafter: torch.nn.Module, examples: Iterable[Example], k: int) -> ChainEstimate:
    """Simulated chains for a drafter that reads only tokens (any causal LM over the target's ids)."""
    drafter.eval()
    device = next(drafter.parameters()).device
    tally = ChainTally(k)
    for example in examples:
        ids, prompt = example.ids, example.prompt_length
        if ids.numel() - prompt < 2:
            continue
        logits = drafter(input_ids=ids[None].to(device)).logits[0]  # [L, V]
        positions = torch.arange(prompt, ids.numel() - 1)
        hits = (logits[positions.to(device)].argmax(-1).cpu() == ids[positions + 1]).numpy()
        # conditioned on the true prefix, the prediction is the same whatever depth the round started at
        tally.add(np.repeat(hits[None], k, axis=0))
    return tally.estimate()


def drafter_agreements(
    target: torch.nn.Module,
    drafters: Mapping[str, torch.nn.Module],
    answers: Sequence[tuple[str, torch.Tensor, Sequence[int]]],
    k: int = AGREEMENT_K,
) -> list[Agreement]:
    """Per drafter and prompt set, the teacher-forced agreement with the target's greedy `answers`.

    Args:
        target: the target model.
        drafters: label → drafter model (our `MambaDrafterForCausalLM`, feature-conditioned or not, or any
            causal LM over the target's token ids).
        answers: `(set, prompt_ids [1, P], answer_ids)` of the target alone's greedy answers.
        k: chain length of the simulated τ.
    """
    from hf_specssm.drafters.mamba import MambaDrafterForCausalLM

    needs_hidden = any(getattr(model, "reads_target_hidden", False) for model in drafters.values())
    examples = answer_examples(target, answers, with_hidden=needs_hidden)
    sets = list(dict.fromkeys(example.domain for example in examples))
    results = []
    for label, model in drafters.items():
        for prompt_set in sets:
            chosen = [example for example in examples if example.domain == prompt_set]
            if isinstance(model, MambaDrafterForCausalLM):
                estimate = evaluate_drafter(model, chosen, k=k)
            else:
                estimate = token_drafter_estimate(model, chosen, k)
            results.append(Agreement(prompt_set, label, len(chosen), estimate))
    return results


def agreement_table(agreements: Sequence[Agreement]) -> str:
    """Markdown: per prompt set and drafter, top-1 agreement, simulated τ and acceptance by position."""
    if not agreements:
        return ""
    k = max(a.estimate.k for a in agreements)
    out = [
        f"Teacher-forced agreement with the target alone's greedy answers (top-1; greedy chains of {k} "
        "simulated at every answer position: τ and P(draft i accepted | drafts before it accepted)):\n",
        "| set | drafter | prompts | top-1 | τ (chains of k) | "
        + " | ".join(str(i + 1) for i in range(k))
        + " |",
        "|---|---|---:|---:|---:|" + "---:|" * k,
    ]
    for a in agreements:
        rates = [f"{rate:.2f}" for rate in a.estimate.acceptance_by_position]
        rates += ["–"] * (k - len(rates))
        out.append(
            f"| {a.set} | {a.drafter} | {a.prompts} | {a.estimate.top1:.3f} | {a.estimate.tau:.2f} | "
            + " | ".join(rates)
            + " |"
        )
    return "\n".join(out) + "\n"
