"""`docs/bench/scripts/feature_sequence_probe.py`: its simulated chains (one batched pass per depth,
attention split between the true keys and the round's own) draft what the head drafts when each round is
recomputed from scratch, feeding its own predicted hidden states — so the probe's τ is the chain's τ."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from tests.helpers.models import build

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "bench" / "scripts" / "feature_sequence_probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("feature_sequence_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def _recomputed(model, example, k: int, own: bool = True) -> np.ndarray:
    """The drafts of every round, each round run as a whole forward per draft (the slow, obvious way),
    feeding the head's own predicted hidden states (`own`) or, as a control, the true ones."""
    answer = example.ids[example.prompt_length :]
    count = answer.numel() - 1
    drafts = np.full((k, count), -1)
    for start in range(count):
        features, tokens = example.hidden[: start + 1].float(), answer[: start + 1]
        for depth in range(min(k, count - start)):
            predicted, logits = model(features[None], tokens[None])
            logits[..., 0] = torch.finfo(logits.dtype).min
            drafts[depth, start + depth] = int(logits[0, -1].argmax())
            fed = predicted[0, -1:] if own else example.hidden[start + depth + 1 : start + depth + 2].float()
            features = torch.cat([features, fed])
            tokens = answer[: start + depth + 2]
    return drafts


@torch.no_grad()
def test_batched_chains_equal_recomputed_rounds():
    probe = _probe()
    target = build("qwen2", seed=0)
    hidden = target.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    vocabulary = torch.arange(3, 40)
    model = probe.FeatureSequenceHead(target, vocabulary).eval()
    with torch.no_grad():
        model.fc.weight.normal_(std=0.5, generator=generator)
    ids = torch.randint(3, 60, (5 + 14,), generator=generator)
    example = SimpleNamespace(ids=ids, prompt_length=5, hidden=torch.randn(14, hidden, generator=generator))
    drafts = probe.chain_drafts(model, example, k=4).numpy()
    recomputed = _recomputed(model, example, k=4)
    assert drafts.shape == (4, 13)
    assert (drafts[1:] >= 0).sum() > 20, "deeper drafts were simulated"
    np.testing.assert_array_equal(drafts, recomputed)
    # the control: rounds fed the true hidden states draft otherwise, so the comparison can fail
    assert (_recomputed(model, example, k=4, own=False)[1:] != drafts[1:]).any()
    # training-time chains: pass m at answer position j drafts what the round started m tokens earlier does
    passes = model.unrolled(example.hidden[None].float(), ids[None, 5:], depth=4)
    for m, (_, logits) in enumerate(passes):
        logits[..., 0] = torch.finfo(logits.dtype).min
        np.testing.assert_array_equal(logits[0, m:13].argmax(-1).numpy(), drafts[m, m:])
    table = probe.chain_table(model, example, probe_to_draft(vocabulary, target.config.vocab_size), k=4)
    assert table.shape == (4, 13) and table.dtype == bool


def probe_to_draft(vocabulary: torch.Tensor, size: int) -> torch.Tensor:
    to_draft = torch.zeros(size, dtype=torch.long)
    to_draft[vocabulary] = torch.arange(1, vocabulary.numel() + 1)
    return to_draft


@torch.no_grad()
def test_the_copied_layer_is_the_targets_last_layer():
    """With the target's own inputs (its last layer's input as `fc`'s output), the probe's layer, norm and
    rows give the target's logits over the probe's vocabulary: the copy and its rotary embedding are
    faithful, so the layer starts from what the target computes."""
    probe = _probe()
    target = build("qwen2", seed=0)
    vocabulary = torch.arange(0, target.config.vocab_size)
    model = probe.FeatureSequenceHead(target, vocabulary).eval()
    ids = torch.randint(3, 60, (1, 11), generator=torch.Generator().manual_seed(1))
    out = target(ids, output_hidden_states=True)
    last_input = out.hidden_states[-2]  # the input of the last decoder layer
    positions = torch.arange(ids.shape[1])[None]
    q, k, v = model.qkv(last_input, positions)
    attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    _, logits = model.finish(last_input, attended)
    torch.testing.assert_close(logits[..., 1:], out.logits, atol=1e-4, rtol=1e-4)
