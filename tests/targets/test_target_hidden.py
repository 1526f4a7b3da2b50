"""The loop hands draft heads the target's last hidden state (the LM head's input) of the right position."""

from __future__ import annotations

import pytest
import torch

import hf_specssm
from hf_specssm.tree import TokenTree

from tests.helpers.models import VOCAB, build
from tests.helpers.scripted import ScriptedDrafter


def head_inputs(model, sequence: torch.Tensor) -> torch.Tensor:
    """`[L, H]` LM-head inputs of a fresh forward over `sequence` `[1, L]`."""
    captured = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    try:
        with torch.no_grad():
            model(input_ids=sequence, logits_to_keep=0)
    finally:
        handle.remove()
    return captured[0][0]


class HiddenRecordingDrafter(ScriptedDrafter):
    """A scripted chain drafter that records every hidden state the loop hands it."""

    wants_target_hidden = True

    def begin(self, input_ids):
        super().begin(input_ids)
        self.observed: list[torch.Tensor] = []
        self.pending: torch.Tensor | None = None

    def observe_target_hidden(self, hidden):
        assert hidden.shape == (1, self.hidden_size)
        self.pending = hidden

    def commit(self, input_ids, num_accepted):
        self.observed.append((input_ids.clone(), self.pending))


class HiddenTreeDrafter(HiddenRecordingDrafter, hf_specssm.TreeDrafter):
    """Drafts a fixed two-branch tree (greedy truth and a wrong sibling) once it has seen a hidden state."""

    shapes_own_trees = True
    max_tree_depth = 2

    def draft_tree(self, input_ids, sampler, shape):
        assert shape is None
        if self.pending is None:
            return TokenTree.chain(torch.empty(0, dtype=torch.long))
        start = input_ids.shape[1]
        truth = [int(self.reference[p]) if p < self.reference.shape[0] else 0 for p in (start, start + 1)]
        tokens = torch.tensor([(truth[0] + 1) % VOCAB, truth[0], truth[1]])
        return TokenTree(tokens=tokens, parents=torch.tensor([-1, -1, 1]))

    def commit_tree(self, input_ids, path):
        self.observed.append((input_ids.clone(), self.pending))


@pytest.mark.parametrize(
    ("target_kind", "drafter_cls"),
    [
        pytest.param("llama", HiddenRecordingDrafter, id="llama-chain"),
        pytest.param("llama", HiddenTreeDrafter, id="llama-dynamic-tree"),
        pytest.param("mamba2", HiddenRecordingDrafter, id="mamba2-chain"),
        pytest.param("jamba", HiddenRecordingDrafter, id="jamba-chain"),
        pytest.param("mamba2", HiddenTreeDrafter, id="mamba2-dynamic-tree"),
    ],
)
def test_observed_hidden_is_the_head_input_before_the_last_committed_token(target_kind, drafter_cls):
    target = hf_specssm.enable(build(target_kind, seed=0))
    prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(0))
    reference = target.generate(prompt, max_new_tokens=20, do_sample=False)
    drafter = drafter_cls(reference, accept_script=[0, 2, 1, 3], num_draft_tokens=3, vocab_size=VOCAB)
    drafter.hidden_size = target.config.get_text_config().hidden_size
    output = target.generate(prompt, assistant_model=drafter, max_new_tokens=20, do_sample=False)
    assert torch.equal(output, reference)
    # (in tree mode the last rounds, with too little room left for a tree, run the target alone)
    assert target.last_speculation_stats.rounds - 1 <= len(drafter.observed)
    expected = head_inputs(target, reference[:, :-1])
    for sequence, hidden in drafter.observed:
        torch.testing.assert_close(hidden[0], expected[sequence.shape[1] - 2], atol=2e-5, rtol=1e-4)
    if drafter_cls is HiddenTreeDrafter:
        assert max(target.last_speculation_stats.accepted_lengths) == 2


def test_draft_heads_take_one_prompt_per_call():
    target = hf_specssm.enable(build("llama", seed=0))
    prompts = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    drafter = HiddenRecordingDrafter(prompts[:1], accept_script=[0], num_draft_tokens=2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="one prompt per call"):
        target.generate(prompts, assistant_model=drafter, max_new_tokens=4, do_sample=False)
