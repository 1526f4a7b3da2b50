"""An SSM or hybrid target: verify in one forward, then bring the recurrent state to the accepted prefix."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from hf_specssm import _compat
from hf_specssm._compat.attention import keep_attention_positions
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm.lean_norm import lean_norms
from hf_specssm.ssm.mixers import MixerInputRecorder, exact_continuation
from hf_specssm.ssm.state_replay import StateRecorder
from hf_specssm.targets.base import SingleRowTarget
from hf_specssm.targets.chain_paths import ChainPathCosts
from hf_specssm.tree import TokenTree, kept_positions

#: how `RecurrentTarget` brings the state to the accepted prefix
RECURRENT_METHODS = ("replay", "refeed", "stepwise")


class RecurrentTarget(SingleRowTarget):
    """An SSM or hybrid target: verify `k` drafts, then commit exactly the accepted prefix.

    Before the verification forward the recurrent state is checkpointed (one copy). Afterwards:

    - `"replay"` (Activation Replay, default). Where every mixer is Mamba2-layout or Gated DeltaNet and the
      `state_replay` probe passed (`state_replay=True`), as the paper has it (`ssm.state_replay`): the
      verification scans one chunk of exactly `T` tokens with the SSM state frozen, records what each
      mixer's state update reads (conv inputs and time steps; the delta rule's keys, values, gates and
      step sizes), and the commit advances the state over the accepted positions by state updates alone
      (no projection, no checkpoint copy). Extra memory per round: `T × (conv_dim + H)` values per Mamba2
      layer (`StateRecorder`).
      Otherwise the SSM mixers' inputs recorded during verification are replayed for the accepted tokens
      only, from the checkpoint. Attention layers are cropped either way.
    - `"refeed"` (snapshot and re-feed): restore the checkpoint and run the whole model again on the
      accepted tokens.
    - `"stepwise"`: verify one token per forward with a checkpoint before each, and roll back to the one
      at the accepted length. The exact fallback where a multi-token forward from a state is not exact
      for the target's mixers (`_compat.probes`): it costs `k + 1` forwards a round.

    Multi-token forwards run inside `ssm.mixers.exact_continuation`, which makes transformers' Mamba v1 /
    Jamba scans start from the cached state instead of zeros.

    Trees are verified by the STree tree scan (`ssm.tree_scan`): every node's output from the committed
    state, attention layers under the tree mask; the accepted path is committed by Activation Replay.
    With `chain_paths`, chains may take that route too (a one-branch tree), whenever the measured round
    times say it is cheaper (`targets.chain_paths`).

    Args:
        model: the target causal LM (Mamba, Mamba2, FalconMamba, Jamba, Bamba, Falcon-H1, Zamba2, …).
        method: one of `RECURRENT_METHODS`.
        tree_problem: why trees cannot be verified here (`None`: the tree scan serves this model).
        state_replay: with `method="replay"`, verify by frozen single-chunk forwards and commit by state
            updates (`ssm.state_replay`); the caller checks the `state_replay` probe.
        conv_only_layers: with `state_replay`, recurrent layers no mixer serves that keep only a conv
            window (LFM2's short convolutions); their commit keeps the last conv inputs.
        chain_paths: measured costs that choose, per chain round, between the multi-token forward above
            and the tree scan (needs `tree_problem=None`); `None`: always the forward.
        fused_verification: with `state_replay`, run each Mamba2-layout mixer's verification between its
            projections as one compiled call (`StateRecorder(fused=True)`, float32 on the CPU); the caller
            checks the `fused_verification` probe.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        method: str = "replay",
        tree_problem: str | None = None,
        state_replay: bool = False,
        conv_only_layers: Sequence[int] = (),
        chain_paths: ChainPathCosts | None = None,
        fused_verification: bool = False,
    ) -> None:
        if method not in RECURRENT_METHODS:
            raise ValueError(f"RecurrentTarget verifies by one of {RECURRENT_METHODS}, got {method!r}.")
        if state_replay and method != "replay":
            raise ValueError(f"state_replay commits by replay; it cannot serve method={method!r}.")
        if chain_paths is not None and "tree" in chain_paths.paths and tree_problem is not None:
            raise ValueError(f"chains cannot take the tree scan here: {tree_problem}")
        super().__init__(model, ForkableCache(model.config))
        self.method = method
        self.recorder = MixerInputRecorder(model)
        self.state_recorder = (
            StateRecorder(model, self.cache, conv_only_layers=conv_only_layers, fused=fused_verification)
            if state_replay
            else None
        )
        self._frozen_round = False
        self._plain_round = False
        self._tree_problem = tree_problem
        self._round_start = 0
        self._kept_tokens: torch.Tensor | None = None
        self._tree_record = None
        self._tree_round = (0, 0)
        self.chain_paths = chain_paths
        # this round: (path, drafts, start time or None for a first round) while a chosen-path chain
        # round runs, else None
        self._chain_round: tuple[str, int, float | None] | None = None

    def tree_problem(self) -> str | None:
        return self._tree_problem

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        num_drafts = draft_tokens.shape[1]
        self._chain_round = None
        if self.chain_paths is not None and num_drafts > 0:
            path = self.chain_paths.choose(num_drafts)
            if input_ids.shape[1] <= self.consumed:
                path = "forward"  # nothing pending to root a tree on (the forward feeds only the drafts)
            # a call's first round also reads the prompt: its time says nothing about the path
            self._chain_round = (path, num_drafts, time.perf_counter() if self.consumed > 0 else None)
            if path == "tree":
                chain = TokenTree(tokens=draft_tokens[0], parents=torch.arange(-1, num_drafts - 1))
                return self.score_tree(input_ids, chain)
        # a round without drafts commits all it feeds, so a first one reads the whole prompt in one
        # forward (as plain decoding does) instead of a prefill plus one more step
        pending = self._pending(input_ids, apart=draft_tokens.shape[1] > 0)
        self.cache.clear_checkpoints()
        self._round_start = self.consumed
        new_tokens = torch.cat([pending, draft_tokens], dim=1)
        self._kept_tokens = new_tokens
        num_logits = draft_tokens.shape[1] + 1
        # frozen only from a state: a layer's first forward initialises (writes) its cache entry
        self._frozen_round = (
            self.state_recorder is not None and new_tokens.shape[1] > 1 and self._round_start > 0
        )
        # no drafts: everything fed is committed, so nothing is checkpointed or recorded (a plain step)
        self._plain_round = draft_tokens.shape[1] == 0
        with self._hidden_capture(num_logits):
            if self._plain_round:
                with exact_continuation(self.model):
                    return self._forward(new_tokens, num_logits)
            if self._frozen_round:
                with self.state_recorder.verifying(new_tokens.shape[1]):
                    logits = self._forward(new_tokens, num_logits)
                self.peak_verification_bytes = max(
                    self.peak_verification_bytes, self.state_recorder.recorded_bytes
                )
                return logits
            if self.method == "stepwise":
                logits = self._score_stepwise(new_tokens, num_logits)
            else:
                self.cache.checkpoint()
                with exact_continuation(self.model):
                    if self.method == "replay":
                        with self.recorder.recording():
                            logits = self._forward(new_tokens, num_logits)
                    else:
                        logits = self._forward(new_tokens, num_logits)
        extra = self.cache.checkpoint_bytes() + (
            self.recorder.recorded_bytes if self.method == "replay" else 0
        )
        self.peak_verification_bytes = max(self.peak_verification_bytes, extra)
        return logits

    def _score_stepwise(self, tokens: torch.Tensor, num_logits: int) -> torch.Tensor:
        """One forward per token, each after a checkpoint; `[1, num_logits, V]`."""
        logits = []
        for position in range(tokens.shape[1]):
            self.cache.checkpoint()
            logits.append(self._forward(tokens[:, position : position + 1], 1))
        return torch.cat(logits, dim=1)[:, -num_logits:]

    def keep(self, length: int) -> None:
        if self._chain_round is not None:
            path, num_drafts, started = self._chain_round
            self._chain_round = None
            if path == "tree":
                self._keep_chain_tree(length, num_drafts)
            else:
                self._keep_chain(length)
            if started is not None:
                self.chain_paths.record(path, num_drafts, time.perf_counter() - started)
            return
        self._keep_chain(length)

    def _keep_chain_tree(self, length: int, num_drafts: int) -> None:
        """`keep(length)` after a chain scored as a one-branch tree: its first `length − fed` nodes."""
        start, chain_length = self._tree_round
        accepted = length - start - chain_length
        if not 0 <= accepted <= num_drafts:
            raise ValueError(
                f"can keep between {start + chain_length} and {start + chain_length + num_drafts} tokens "
                f"this round, not {length}."
            )
        self.keep_tree(list(range(accepted)))

    def _keep_chain(self, length: int) -> None:
        if not self._round_start <= length <= self.consumed:
            raise ValueError(
                f"can keep between {self._round_start} and {self.consumed} tokens this round, not {length}."
            )
        if self._plain_round:
            if length != self.consumed:
                raise ValueError(f"a round without drafts keeps all {self.consumed} tokens, not {length}.")
            self._plain_round = False
            return
        if self._frozen_round:
            # the SSM layers still hold the state from before the round: advance them over what was kept
            self.state_recorder.commit(length - self._round_start)
            self.state_recorder.clear()
            self._frozen_round = False
            self.cache.crop_attention(length)
            self.cache.set_length(length)
            self.consumed = length
            return
        if length < self.consumed:
            if self.method == "replay":
                self.cache.rewind_recurrent(self._round_start)
                self.cache.crop_attention(length)
                self.recorder.replay(start=0, length=length - self._round_start)
                self.cache.set_length(length)
                self.consumed = length
            elif self.method == "stepwise":
                self.cache.rollback_to(length)
                self.consumed = length
            else:
                self.cache.rollback_to(self._round_start)
                self.consumed = self._round_start
                if length > self._round_start:
                    with exact_continuation(self.model):
                        self._forward(self._kept_tokens[:, : length - self._round_start], 1)
        self.cache.clear_checkpoints()
        self.recorder.clear()

    def score_tree(self, input_ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """Logits after the root and after every node of `tree`, in one forward (STree tree scan).

        SSM mixers compute every node from the committed state with the tree's ancestor structure and
        write no state (`ssm.tree_scan.tree_verification`); attention layers of hybrids get the tree's 4D
        mask and positions. `keep_tree` then commits the accepted path.

        Returns:
            `[1, 1 + N, V]` float32 logits: row 0 after the root (last committed token), row `1 + i` after
            node `i`.
        """
        from hf_specssm.ssm.tree_scan import forward_parents, tree_verification

        if self._tree_problem is not None:
            raise ValueError(self._tree_problem)
        pending = self._pending(input_ids, apart=True)
        self.cache.clear_checkpoints()
        start, chain_length = self.consumed, pending.shape[1]
        inputs = {}
        if any(_compat.is_attention_layer(layer) for layer in self.cache.layers):
            inputs = self._tree_inputs(tree, chain_length, pending.device)
        tokens = torch.cat([pending, tree.tokens[None].to(pending.device)], dim=1)
        parents = forward_parents(tree, chain_length)
        with (
            lean_norms(self.state_recorder.norms if self.state_recorder is not None else ()),
            tree_verification(
                self.model,
                self.cache,
                parents,
                self.state_recorder.fused_routes if self.state_recorder is not None else None,
            ) as record,
            self._hidden_capture(tree.size + 1),
        ):
            logits = self._forward(tokens, tree.size + 1, **inputs)
        self._tree_record = record
        self._tree_round = (start, chain_length)
        self.peak_verification_bytes = max(self.peak_verification_bytes, record.recorded_bytes)
        return logits

    def keep_tree(self, path: list[int]) -> None:
        """Commit the fed chain and the nodes of `path`: SSM layers by Activation Replay of the recorded
        inputs at those positions (N-step state update from the committed state), attention layers by
        keeping their keys."""
        start, chain_length = self._tree_round
        positions = torch.cat(
            [torch.arange(chain_length), torch.tensor(path, dtype=torch.long) + chain_length]
        )
        self._tree_record.commit(self.cache, positions)
        self._tree_record = None
        keep_attention_positions(self.cache, kept_positions(start, chain_length, path))
        self.consumed = start + chain_length + len(path)
        self.cache.set_length(self.consumed)
