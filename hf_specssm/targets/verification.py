"""Target side of a round: score the drafts in one forward, then keep the cache for the accepted prefix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import LogitsProcessorList, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache

from hf_specssm import _compat
from hf_specssm.cache import ForkableCache
from hf_specssm.ssm.mixers import MixerInputRecorder, check_identity_steps, exact_continuation, identity_steps
from hf_specssm.tree import TokenTree, compile_tree, kept_positions

VERIFICATION_METHODS = ("replay", "joint", "refeed")


class AttentionTarget:
    """A Transformer target verifying a chain of drafts against its KV cache.

    The cache always holds the committed tokens except the last one (whose logits the next round needs),
    so a round feeds `[last committed token(s), d_1 … d_k]` and reads `k + 1` positions of logits.

    Args:
        model: the target causal LM.
        cache: its cache from `generate` (a new `DynamicCache` when `None`); sliding-window layers are
            switched to past recording so they can be cropped.
    """

    def __init__(self, model: PreTrainedModel, cache: Cache | None) -> None:
        self.model = model
        self.cache_name = _compat.cache_kwarg_name(model)
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        _compat.enable_attention_rollback(self.cache)
        self.consumed = self.cache.get_seq_length()
        self._pass_logits_to_keep = _compat.forward_accepts(model, "logits_to_keep")
        self._pass_positions = _compat.forward_accepts(model, "position_ids")
        self.peak_verification_bytes = 0
        #: when true, `score` / `score_tree` keep the LM head's input of the scored positions in
        #: `last_hidden` (`[1, n, H]`, same rows as the logits they return) for draft heads.
        self.capture_hidden = False
        self.last_hidden: torch.Tensor | None = None

    @contextlib.contextmanager
    def _hidden_capture(self, num_positions: int, row: int = 0) -> Iterator[None]:
        """While active (and `capture_hidden` is set), keep row `row`'s last `num_positions` LM-head inputs."""
        if not self.capture_hidden:
            yield
            return
        head = self.model.get_output_embeddings()
        if head is None:
            raise ValueError(
                f"{type(self.model).__name__} has no output embedding to read hidden states from."
            )

        def grab(module, args):
            self.last_hidden = args[0][row : row + 1, -num_positions:].detach().clone()

        handle = head.register_forward_pre_hook(grab)
        try:
            yield
        finally:
            handle.remove()

    def _forward(self, tokens: torch.Tensor, num_logits: int) -> torch.Tensor:
        """Run `tokens` `[1, T]` from the cache; return the last `num_logits` logits `[1, num_logits, V]`."""
        start = self.consumed
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if self._pass_positions:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            kwargs["position_ids"] = positions.expand(tokens.shape[0], -1)
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = num_logits
        logits = self.model(input_ids=tokens, **kwargs).logits[:, -num_logits:].float()
        self.consumed = start + tokens.shape[1]
        return logits

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        """Logits after each prefix of the draft, in one forward.

        Args:
            input_ids: `[1, L]` committed tokens.
            draft_tokens: `[1, k]` drafts.

        Returns:
            `[1, k + 1, V]` float32 logits; row `i` predicts the token after `i` drafts.
        """
        new_tokens = torch.cat([input_ids[:, self.consumed :], draft_tokens], dim=1)
        with self._hidden_capture(draft_tokens.shape[1] + 1):
            return self._forward(new_tokens, draft_tokens.shape[1] + 1)

    def close(self) -> None:
        """Called once after the last round: leave `cache` as a one-row cache of the committed tokens."""

    def keep(self, length: int) -> None:
        """Drop every cached token past `length` (the accepted prefix)."""
        if length > self.consumed:
            raise ValueError(f"cannot keep {length} tokens, the cache holds {self.consumed}.")
        self.cache.crop(length - self.consumed)
        self.consumed = length

    def score_tree(self, input_ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """Logits after the root and after every node of `tree`, in one forward with a tree mask.

        Returns:
            `[1, 1 + N, V]` float32 logits: row 0 after the root (last committed token), row `1 + i` after
            node `i`.
        """
        if any(_compat.is_sliding_attention_layer(layer) for layer in self.cache.layers):
            raise ValueError("tree verification does not support sliding-window attention targets yet.")
        chain = input_ids[:, self.consumed :]
        compiled = compile_tree(tree, self.consumed, chain.shape[1], self.model.dtype)
        kwargs = {
            self.cache_name: self.cache,
            "use_cache": True,
            "attention_mask": compiled.attention_mask,
            "position_ids": compiled.position_ids,
        }
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = tree.size + 1
        tokens = torch.cat([chain, tree.tokens[None].to(chain.device)], dim=1)
        with self._hidden_capture(tree.size + 1):
            logits = self.model(input_ids=tokens, **kwargs).logits[:, -(tree.size + 1) :].float()
        self._tree_round = (self.consumed, chain.shape[1])
        self.consumed += tokens.shape[1]
        return logits

    def keep_tree(self, path: list[int]) -> None:
        """Keep the cached prefix, the fed chain and the nodes of `path`; drop every other node's keys."""
        past, chain = self._tree_round
        positions = kept_positions(past, chain, path)
        for layer in self.cache.layers:
            if getattr(layer, "is_initialized", False) and layer.keys is not None and layer.keys.numel() > 0:
                index = positions.to(layer.keys.device)
                layer.keys = layer.keys.index_select(2, index)
                layer.values = layer.values.index_select(2, index)
        self.consumed = past + chain + len(path)


class _RecurrentStateTarget(AttentionTarget):
    """A target whose `ForkableCache` counts the tokens it consumed (recurrent layers cannot count them)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__(model, ForkableCache(model.config))

    def _forward(self, tokens: torch.Tensor, num_logits: int) -> torch.Tensor:
        logits = super()._forward(tokens, num_logits)
        self.cache.advance(tokens.shape[1])
        return logits


class RecurrentTarget(_RecurrentStateTarget):
    """An SSM or hybrid target: verify `k` drafts in one forward, then commit exactly the accepted prefix.

    Before the verification forward the recurrent state is checkpointed (one copy). Afterwards:

    - `"replay"` (Activation Replay, default): the SSM mixers' inputs recorded during verification are
      replayed for the accepted tokens only, from the checkpoint; attention layers are cropped. Extra
      memory per round: one `[1, k + 1, H]` activation per SSM layer plus one state copy.
    - `"refeed"` (snapshot and re-feed, for comparison): restore the checkpoint and run the whole model
      again on the accepted tokens.

    Multi-token forwards run inside `mixers.exact_continuation`, which makes transformers' Mamba v1 /
    Jamba scans start from the cached state instead of zeros.

    Args:
        model: the target causal LM (Mamba, Mamba2, FalconMamba, Jamba, Bamba, Falcon-H1, Zamba2, …).
        method: `"replay"` or `"refeed"`.
    """

    def __init__(self, model: PreTrainedModel, method: str = "replay") -> None:
        if method not in ("replay", "refeed"):
            raise ValueError(f"RecurrentTarget verifies by 'replay' or 'refeed', got {method!r}.")
        super().__init__(model)
        self.method = method
        self.recorder = MixerInputRecorder(model)
        self._round_start = 0

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        pending = input_ids[:, self.consumed :]
        if self.consumed == 0 and pending.shape[1] > 1:
            # Prefill apart from the round: the commit then replays (or re-feeds) only this round's
            # tokens, not the whole prompt.
            self._forward(pending[:, :-1], 1)
            pending = pending[:, -1:]
        self.cache.clear_checkpoints()
        self.cache.checkpoint()
        self._round_start = self.consumed
        new_tokens = torch.cat([pending, draft_tokens], dim=1)
        self._kept_tokens = new_tokens
        with exact_continuation(self.model), self._hidden_capture(draft_tokens.shape[1] + 1):
            if self.method == "replay":
                with self.recorder.recording():
                    logits = self._forward(new_tokens, draft_tokens.shape[1] + 1)
            else:
                logits = self._forward(new_tokens, draft_tokens.shape[1] + 1)
        extra = self.cache.checkpoint_bytes() + (
            self.recorder.recorded_bytes if self.method == "replay" else 0
        )
        self.peak_verification_bytes = max(self.peak_verification_bytes, extra)
        return logits

    def keep(self, length: int) -> None:
        if not self._round_start <= length <= self.consumed:
            raise ValueError(
                f"can keep between {self._round_start} and {self.consumed} tokens this round, not {length}."
            )
        if length == self.consumed:
            self.cache.clear_checkpoints()
            self.recorder.clear()
            return
        if self.method == "replay":
            self.cache.rewind_recurrent(self._round_start)
            self.cache.crop_attention(length)
            self.recorder.replay(start=0, length=length - self._round_start)
            self.cache.set_length(length)
            self.consumed = length
        else:
            kept = self._kept_tokens
            self.cache.rollback_to(self._round_start)
            self.consumed = self._round_start
            if length > self._round_start:
                with exact_continuation(self.model):
                    self._forward(kept[:, : length - self._round_start], 1)
        self.cache.clear_checkpoints()
        self.recorder.clear()

    def score_tree(self, input_ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        """Logits after the root and after every node of `tree`, in one forward (STree tree scan).

        SSM mixers compute every node from the committed state with the tree's ancestor structure and
        write no state (`tree_scan.tree_verification`); attention layers of hybrids get the tree's 4D mask
        and positions. `keep_tree` then commits the accepted path.

        Returns:
            `[1, 1 + N, V]` float32 logits: row 0 after the root (last committed token), row `1 + i` after
            node `i`.
        """
        from hf_specssm.ssm.tree_scan import forward_parents, tree_verification

        pending = input_ids[:, self.consumed :]
        if self.consumed == 0 and pending.shape[1] > 1:
            # prefill apart from the round, as `score` does
            with exact_continuation(self.model):
                self._forward(pending[:, :-1], 1)
            pending = pending[:, -1:]
        self.cache.clear_checkpoints()
        start, chain_length = self.consumed, pending.shape[1]
        kwargs = {self.cache_name: self.cache, "use_cache": True}
        if any(_compat.is_attention_layer(layer) for layer in self.cache.layers):
            compiled = compile_tree(tree, start, chain_length, self.model.dtype)
            kwargs["attention_mask"] = compiled.attention_mask.to(pending.device)
            kwargs["position_ids"] = compiled.position_ids.to(pending.device)
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = tree.size + 1
        tokens = torch.cat([pending, tree.tokens[None].to(pending.device)], dim=1)
        parents = forward_parents(tree, chain_length)
        with (
            tree_verification(self.model, self.cache, parents) as record,
            self._hidden_capture(tree.size + 1),
        ):
            logits = self.model(input_ids=tokens, **kwargs).logits[:, -(tree.size + 1) :].float()
        self._tree_record = record
        self._tree_round = (start, chain_length)
        self.consumed = start + tokens.shape[1]
        self.peak_verification_bytes = max(self.peak_verification_bytes, record.recorded_bytes)
        return logits

    def keep_tree(self, path: list[int]) -> None:
        """Commit the fed chain and the nodes of `path`: SSM layers by Activation Replay of the recorded
        inputs at those positions (N-step state update from the committed state), attention layers by
        keeping their keys."""
        _, chain_length = self._tree_round
        positions = torch.cat(
            [torch.arange(chain_length), torch.tensor(path, dtype=torch.long) + chain_length]
        )
        self._tree_record.commit(self.cache, positions)
        self._tree_record = None
        super().keep_tree(path)
        self.cache.set_length(self.consumed)


class JointTarget(_RecurrentStateTarget):
    """An SSM or hybrid target verified by Joint Attainment and Advancement (*Snakes and Ladders*).

    The cache holds two rows. Each round feeds both rows the tokens committed since the last correct state
    (the *pending* tokens: last round's accepted drafts and the target's token) followed by the `k` drafts:

    - row 1 (attainment) runs every step and yields the `k + 1` logits to verify;
    - row 0 (advancement) skips the draft positions (Δ = 0 there, conv window cut at the last pending
      token), so after the forward it holds the exact state after the pending tokens, whatever is accepted.

    Row 0's state is then copied to row 1, and attention layers (hybrids) are cropped to the pending tokens:
    both rows computed identical keys there. Nothing is stored across the forward and nothing is replayed;
    the cost is one extra batch row (a second copy of the state and, for hybrids, of the KV cache) and
    re-feeding the accepted tokens next round (inputs of `m + k` tokens, `1 ≤ m ≤ k + 1`).

    Args:
        model: an SSM or hybrid target whose mixers are Mamba or Mamba2 style (`mixers.identity_steps`).
    """

    def __init__(self, model: PreTrainedModel) -> None:
        check_identity_steps(model)
        super().__init__(model)
        self._kept_range = (0, 0)
        self._forked = False

    def score(self, input_ids: torch.Tensor, draft_tokens: torch.Tensor) -> torch.Tensor:
        pending = input_ids[:, self.consumed :]
        if self.consumed == 0 and pending.shape[1] > 1:
            # one-row prefill, then two rows for the rounds
            with exact_continuation(self.model):
                self._forward(pending[:, :-1], 1)
            pending = pending[:, -1:]
        if not self._forked:
            self.cache.fork(2)
            self._forked = True
        start, num_pending, num_draft = self.consumed, pending.shape[1], draft_tokens.shape[1]
        tokens = torch.cat([pending, draft_tokens], dim=1).expand(2, -1)
        skip = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
        skip[0, num_pending:] = True
        with (
            exact_continuation(self.model),
            identity_steps(self.model, skip),
            self.cache.ragged_conv_rows([num_pending, tokens.shape[1]]),
            self._hidden_capture(num_draft + 1, row=1),
        ):
            logits = self._forward(tokens, num_draft + 1)[1:2]
        self.peak_verification_bytes = max(self.peak_verification_bytes, self._row_bytes())
        # advancement: row 0 is the state after the pending tokens, whatever is accepted
        for state in self.cache.state_tensors():
            state[1:].copy_(state[:1].expand_as(state[1:]))
        self.cache.crop_attention(start + num_pending)
        self.cache.set_length(start + num_pending)
        self.consumed = start + num_pending
        self._kept_range = (self.consumed, self.consumed + num_draft)
        return logits

    def _row_bytes(self) -> int:
        """Bytes of one batch row of the cache: what the extra verification row costs."""
        tensors = list(self.cache.state_tensors())
        for keys, values in self.cache.attention_tensors():
            tensors += [keys, values]
        return sum(t.numel() * t.element_size() for t in tensors) // 2

    def keep(self, length: int) -> None:
        low, high = self._kept_range
        if not low <= length <= high:
            raise ValueError(f"can keep between {low} and {high} tokens this round, not {length}.")
        # nothing to undo: the tokens past `consumed` are fed again next round

    def score_tree(self, input_ids: torch.Tensor, tree: TokenTree) -> torch.Tensor:
        raise ValueError("Joint Attainment and Advancement verifies chains; trees need the SSM tree scan.")

    def close(self) -> None:
        if self._forked:
            self.cache.select(torch.tensor([0]))
            self._forked = False


def process_tree_scores(
    logits_processor: LogitsProcessorList | None,
    input_ids: torch.Tensor,
    tree: TokenTree,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Processed scores after the root and each node, each with its own root-to-node prefix.

    Args:
        input_ids: `[1, L]` committed tokens.
        logits: `[1, 1 + N, V]` raw target logits from `score_tree`.

    Returns:
        `[1 + N, V]`.
    """
    if not logits_processor:
        return logits[0].clone()
    rows = [logits_processor(input_ids, logits[:, 0].clone())]
    for node in range(tree.size):
        path_tokens = tree.tokens[tree.path(node)].to(input_ids.device)[None]
        rows.append(logits_processor(torch.cat([input_ids, path_tokens], dim=1), logits[:, node + 1].clone()))
    return torch.cat(rows, dim=0)


def process_scores(
    logits_processor: LogitsProcessorList | None,
    input_ids: torch.Tensor,
    draft_tokens: torch.Tensor,
    logits: torch.Tensor,
) -> torch.Tensor:
    """Apply the processors at every verified position, each with its own prefix (as plain decoding would).

    Args:
        input_ids: `[1, L]` committed tokens.
        draft_tokens: `[1, k]`.
        logits: `[1, k + 1, V]` raw target logits.

    Returns:
        `[k + 1, V]` processed scores.
    """
    if not logits_processor:
        return logits[0].clone()
    sequence = torch.cat([input_ids, draft_tokens], dim=1)
    length = input_ids.shape[1]
    rows = [logits_processor(sequence[:, : length + i], logits[:, i].clone()) for i in range(logits.shape[1])]
    return torch.cat(rows, dim=0)
