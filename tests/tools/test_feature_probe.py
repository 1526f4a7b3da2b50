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
def _recomputed(model, example, k: int, own: bool = True, prompt: torch.Tensor | None = None) -> np.ndarray:
    """The drafts of every round, each round run as a whole forward per draft (the slow, obvious way),
    feeding the head's own predicted hidden states (`own`) or, as a control, the true ones. With `prompt`
    (`[P, H]`) every forward starts with the prompt's positions: zeros then the prompt's states beside its
    tokens."""
    answer = example.ids[example.prompt_length :]
    count = answer.numel() - 1
    drafts = np.full((k, count), -1)
    if prompt is None:
        lead_features, lead_tokens = torch.zeros(0, example.hidden.shape[1]), answer[:0]
    else:
        lead_features = torch.cat([torch.zeros(1, prompt.shape[1]), prompt[:-1]])
        lead_tokens = example.ids[: example.prompt_length]
    for start in range(count):
        features, tokens = example.hidden[: start + 1].float(), answer[: start + 1]
        for depth in range(min(k, count - start)):
            predicted, logits = model(
                torch.cat([lead_features, features])[None], torch.cat([lead_tokens, tokens])[None]
            )
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


def _random_probe(seed: int, attention_scale: float = 1.0):
    """The probe module, a probe layer copied from a tiny Qwen2 with a random `fc` (and its attention
    output scaled by `attention_scale`), the hidden size, and the generator that drew them."""
    probe = _probe()
    target = build("qwen2", seed=0)
    generator = torch.Generator().manual_seed(seed)
    model = probe.FeatureSequenceHead(target, torch.arange(3, 40)).eval()
    with torch.no_grad():
        model.fc.weight.normal_(std=0.5, generator=generator)
        model.layer.self_attn.o_proj.weight.mul_(attention_scale)
    return probe, model, target.config.hidden_size, generator


@torch.no_grad()
def test_chains_over_the_prompt_equal_recomputed_rounds():
    """With the prompt's positions as context (`--context prompt`), the batched chains still draft what
    rounds recomputed from scratch over prompt + answer so far draft; and the prompt matters: chains
    without it draft otherwise."""
    # attention, not the residual, decides the argmax
    probe, model, hidden, generator = _random_probe(seed=2, attention_scale=30.0)
    ids = torch.randint(3, 60, (7 + 12,), generator=generator)
    example = SimpleNamespace(ids=ids, prompt_length=7, hidden=torch.randn(12, hidden, generator=generator))
    prompt = torch.randn(7, hidden, generator=generator)
    drafts = probe.chain_drafts(model, example, k=4, prompt=prompt).numpy()
    assert drafts.shape == (4, 11) and (drafts[1:] >= 0).sum() > 15
    np.testing.assert_array_equal(drafts, _recomputed(model, example, k=4, prompt=prompt))
    assert (probe.chain_drafts(model, example, k=4).numpy() != drafts).any()
    features, tokens, offset = probe.sequence(example, prompt)
    assert offset == 7 and features.shape == (19, hidden) and torch.equal(tokens, ids)
    assert torch.equal(features[0], torch.zeros(hidden)) and torch.equal(features[7], example.hidden[0])
    # training-time chains over prompt + answer (`--unroll` with `--context prompt`): at answer position s,
    # pass m drafts what the round started m tokens earlier drafts
    passes = model.unrolled(features[None], tokens[None], depth=4)
    for m, (_, logits) in enumerate(passes):
        logits[..., 0] = torch.finfo(logits.dtype).min
        np.testing.assert_array_equal(logits[0, offset + m : offset + 11].argmax(-1).numpy(), drafts[m, m:])


@torch.no_grad()
def test_answer_queries_equal_the_full_forward_at_those_positions():
    """`answer_forward` (queries only at the answer's positions, a padded row repeating its last one)
    gives the full causal forward's outputs there, row by row of a right-padded batch."""
    _, model, hidden, generator = _random_probe(seed=3)
    features = torch.randn(2, 10, hidden, generator=generator)
    tokens = torch.randint(3, 60, (2, 10), generator=generator)
    queries = torch.tensor([[4, 5, 6, 7, 8, 9], [6, 7, 7, 7, 7, 7]])  # row 1: 8 real positions, answer of 2
    predicted, logits = model.answer_forward(features, tokens, queries)
    for row, (width, count) in enumerate([(10, 6), (8, 2)]):
        full_predicted, full_logits = model(features[row : row + 1, :width], tokens[row : row + 1, :width])
        index = queries[row, :count]
        torch.testing.assert_close(logits[row, :count], full_logits[0, index], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(predicted[row, :count], full_predicted[0, index], atol=1e-5, rtol=1e-5)


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


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_keys_name_the_prompt_only():
    """`prompt_features.py` files a chat's prompt states under a key of its prompt's ids: the answer does
    not change it, another prompt length or token does; the probe's training order is seeded."""
    features = _sibling("prompt_features")
    ids = torch.tensor([5, 6, 7, 8, 9])
    key = features.prompt_key(ids, 3)
    assert key == features.prompt_key(torch.tensor([5, 6, 7, 1, 1, 1]), 3)
    assert key != features.prompt_key(ids, 4) and key != features.prompt_key(torch.tensor([5, 6, 8]), 3)
    assert features.seeded_order(50) == features.seeded_order(50) and sorted(
        features.seeded_order(50)
    ) == list(range(50))


@torch.no_grad()
def test_draft_step_cost_steps_leave_the_cache_as_they_found_it():
    """`draft_step_cost.py` times the target's decode step by stepping and cropping the step's token off
    again (a count transformers 5.17 and 5.23 both take), and a chain of the attending layer over a cache."""
    cost = _sibling("draft_step_cost")
    probe = _probe()
    target = build("qwen2", seed=0).eval()
    from transformers import DynamicCache

    cache = DynamicCache(config=target.config)
    target(torch.randint(3, 60, (1, 9)), past_key_values=cache, use_cache=True)
    for _ in range(3):
        cost.target_step(target, cache, torch.tensor([4]))
        assert cache.get_seq_length() == 9
    layer = probe.FeatureSequenceHead(target, torch.arange(3, 40)).eval()
    keys = torch.randn(1, layer.heads, 9, layer.head_dim)
    cost.layer_chain(
        layer, keys, torch.randn_like(keys), torch.randn(1, target.config.hidden_size), torch.tensor([4]), 3
    )


@torch.no_grad()
def test_grouped_evaluation_equals_evaluating_each_group_alone():
    """`evaluate(..., group=...)` (one chain table per chat, tallied into the whole and its group) gives
    what evaluating all chats and each group's chats separately gives; chats that are not greedy are left
    out of both."""
    probe, model, hidden, generator = _random_probe(seed=4, attention_scale=30.0)
    to_draft = probe_to_draft(torch.arange(3, 40), 64)
    chats = []
    for index, (domain, mode) in enumerate(
        [("a", "greedy"), ("b", "greedy"), ("a", "greedy"), ("b", "t0.7")]
    ):
        ids = torch.randint(3, 40, (4 + 9 + index,), generator=generator)
        chats.append(
            SimpleNamespace(ids=ids, prompt_length=4, mode=mode, domain=domain,
                            hidden=torch.randn(9 + index, hidden, generator=generator))
        )  # fmt: skip
    grouped = probe.evaluate(model, chats, to_draft, 4, group=lambda chat: chat.domain)
    assert grouped["all"] == probe.evaluate(model, chats, to_draft, 4)
    assert grouped["a"] == {"chats": 2, **probe.evaluate(model, [chats[0], chats[2]], to_draft, 4)}
    assert grouped["b"] == {"chats": 1, **probe.evaluate(model, [chats[1]], to_draft, 4)}
    assert grouped["a"] != grouped["b"]
