"""A drafter backed by a transformers causal LM: Mamba, Mamba2, FalconMamba, hybrids or Transformers."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from hf_specssm import _compat
from hf_specssm.cache import CacheSnapshot, ForkableCache
from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, DraftSampler, TreeDrafter
from hf_specssm.policies.tree_shape import DynamicTreePolicy, UCBTreePolicy
from hf_specssm.ssm.lean_step import lean_step_mixers, lean_steps
from hf_specssm.tree import TokenTree

# Recurrent drafters step pending tokens one at a time up to this many: a Mamba2 multi-token forward is
# padded to `chunk_size` and costs far more than a couple of single steps.
_MAX_STEPWISE_CATCH_UP = 4


class ModelDrafter(TreeDrafter):
    """Drafts with any transformers causal LM, keeping its cache across rounds.

    The drafter never re-reads the prefix: each round it consumes only the committed tokens it has not
    seen (after the first round: the accepted tokens it did not feed itself, plus the target's token),
    then feeds its own drafts one by one. Before each draft step the recurrent state is checkpointed, so
    after verification the state is rolled back to exactly the accepted prefix (conv and SSM state for
    recurrent layers, a crop for attention layers) without recomputation.

    Args:
        model: a causal LM such as `MambaForCausalLM`, `Mamba2ForCausalLM`, `FalconMambaForCausalLM`,
            a hybrid (`BambaForCausalLM`, …) or any Transformer (`LlamaForCausalLM`, …).
        config: draft-length options (default `DraftConfig()`).
        tree_policy: pick the tree per round: `UCBTreePolicy()` (a bandit over shapes) or
            `DynamicTreePolicy()` (EAGLE-2 style confidence-grown trees); overrides `tree_shape`.
        **options: shorthand for `DraftConfig` fields, e.g. `ModelDrafter(m, num_draft_tokens=4,
            schedule="constant")`.
    """

    catches_up = True  # its next draft reads every token committed since its last one, in one forward

    def __init__(
        self,
        model: PreTrainedModel,
        config: DraftConfig | None = None,
        tree_policy: UCBTreePolicy | DynamicTreePolicy | None = None,
        **options,
    ) -> None:
        if config is not None and options:
            raise ValueError("pass either `config` or DraftConfig fields as keyword arguments, not both.")
        super().__init__(config if config is not None else DraftConfig(**options))
        self.tree_policy = tree_policy
        _check_causal_lm(model, role="drafter")
        self.model = model
        self._cache_name = _compat.cache_kwarg_name(model)
        self._pass_positions = _compat.forward_accepts(model, "position_ids")
        self._pass_logits_to_keep = _compat.forward_accepts(model, "logits_to_keep")
        self._exact_continuation = _compat.multi_token_continuation_is_exact(model)
        # Mamba2-layout drafters step through the lean one-token conv and state update (`ssm.lean_step`)
        self._lean_mixers = lean_step_mixers(model)
        self.cache: ForkableCache | None = None
        self._round_start = 0
        self._round_drafted = 0

    @property
    def vocab_size(self) -> int:
        # reduced-vocabulary drafters (MambaDrafterForCausalLM) return logits over the target's vocabulary
        output_vocab = getattr(self.model, "output_vocab_size", None)
        return output_vocab or self.model.config.get_text_config(decoder=True).vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    def begin(self, input_ids: torch.Tensor) -> None:
        self.cache = ForkableCache(self.model.config)
        self._round_start = 0
        self._round_drafted = 0

    def end(self) -> None:
        self.cache = None

    def _forward(self, tokens: torch.Tensor, rows: int = 1, depth: int = 0) -> torch.Tensor:
        """Run `tokens` `[R, T]` through the model from the cache; return the last logits `[R, V]` (fp32).

        `depth` counts the drafter's own tokens among those fed this round (0 for committed tokens): drafters
        that condition on it (`FeatureDrafter`) read it in `_extra_inputs`.
        """
        start = self.cache.seen_tokens
        kwargs = {self._cache_name: self.cache, "use_cache": True, **self._extra_inputs(rows, depth)}
        if self._pass_positions:
            positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            kwargs["position_ids"] = positions[None].expand(rows, -1)
        if self._pass_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with lean_steps(self.model, self._lean_mixers), _compat.grouped_query_attention():
            logits = self.model(input_ids=tokens, **kwargs).logits[:, -1].float()
        self.cache.advance(tokens.shape[1])
        return logits

    def _extra_inputs(self, rows: int, depth: int) -> dict:
        """More forward arguments for `rows` rows at draft depth `depth` (none for token-only models)."""
        return {}

    def _consume(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed committed tokens `[1, T]` the drafter has not seen; return the next-token logits `[1, V]`."""
        stepwise = self.cache.seen_tokens > 0 and self.cache.has_recurrent_state
        # Multi-token forwards from a state are exact only for some mixers; short catch-ups are cheaper
        # stepwise anyway.
        if stepwise and (not self._exact_continuation or tokens.shape[1] <= _MAX_STEPWISE_CATCH_UP):
            logits = None
            for position in range(tokens.shape[1]):
                logits = self._forward(tokens[:, position : position + 1])
            return logits
        return self._forward(tokens)

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        if self.cache is None:
            raise RuntimeError("call begin() before draft().")
        pending = input_ids[:, self.cache.seen_tokens :]
        if pending.shape[1] == 0:
            raise RuntimeError(
                "the drafter has already consumed every committed token; commit() was skipped."
            )
        logits = self._consume(pending)
        self._round_start = self.cache.seen_tokens
        stop_below = self.config.confidence_stop
        tokens, probs = [], []
        sequence = input_ids
        for step in range(num_tokens):
            token, token_probs = sampler.choose(sequence, logits)
            tokens.append(token)
            probs.append(token_probs)
            if step == num_tokens - 1:
                break
            if stop_below is not None and _confidence(logits, token, token_probs) < stop_below:
                break
            sequence = torch.cat([sequence, token[:, None]], dim=1)
            self.cache.checkpoint()
            logits = self._forward(token[:, None], depth=step + 1)
        self._round_drafted = len(tokens)
        draft_tokens = torch.stack(tokens, dim=1) if tokens else input_ids.new_empty((input_ids.shape[0], 0))
        draft_probs = torch.stack(probs, dim=1) if probs and probs[0] is not None else None
        return Draft(tokens=draft_tokens, probs=draft_probs)

    @property
    def max_tree_depth(self) -> int | None:
        """Depth of the trees a `DynamicTreePolicy` grows (`None` with fixed shapes: their length)."""
        return self.tree_policy.depth if isinstance(self.tree_policy, DynamicTreePolicy) else None

    @torch.no_grad()
    def draft_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, shape: tuple[int, ...] | None = None
    ) -> TokenTree:
        """Draft a tree by forking the state along the batch axis.

        With a shape (default `config.tree_shape`), each depth expands every frontier node into its `w`
        children (top-`w`, or sampled without replacement with `tree_children="sample"` when sampling);
        with `shape=None` and a `DynamicTreePolicy`, the tree grows from the drafter's confidence. Either
        way each depth feeds all new frontier nodes in one batched step (the state is copied to the new rows
        by `ForkableCache.select`), so the cost grows with the nodes per depth, not with the prefix. The
        last depth is not fed.

        Returns:
            the tree (`N` nodes; with `draft_probs` `[N, V]` when its children were sampled).
        """
        pending = input_ids[:, self.cache.seen_tokens :]
        logits = self._consume(pending)
        self._tree_root = self.cache.snapshot()
        self._tree_levels = []
        if shape is None and isinstance(self.tree_policy, DynamicTreePolicy):
            return self._grow_dynamic_tree(input_ids, sampler, logits, self.tree_policy)
        shape = shape if shape is not None else self.config.tree_shape
        sample = sampler.do_sample and self.config.tree_children == "sample"
        tokens: list[int] = []
        parents: list[int] = []
        node_probs: list[torch.Tensor] = []
        frontier, paths = [-1], [input_ids]
        for depth, width in enumerate(shape):
            children, probs = _choose_children(sampler, paths, logits, width, sample)
            sources, new_frontier, new_paths = [], [], []
            for row, parent in enumerate(frontier):
                for token in children[row].tolist():
                    tokens.append(token)
                    parents.append(parent)
                    if probs is not None:
                        node_probs.append(probs[row])
                    sources.append(row)
                    new_frontier.append(len(tokens) - 1)
                    new_paths.append(torch.cat([paths[row], paths[row].new_tensor([[token]])], dim=1))
            frontier, paths = new_frontier, new_paths
            if depth == len(shape) - 1:
                break
            logits = self._feed_level(sources, [tokens[node] for node in frontier], frontier, depth + 1)
        return TokenTree(
            tokens=torch.tensor(tokens),
            parents=torch.tensor(parents),
            draft_probs=torch.stack(node_probs) if sample else None,
            sampled_without_replacement=sample,
        )

    def _feed_level(
        self, sources: list[int], tokens: list[int], nodes: list[int], depth: int
    ) -> torch.Tensor:
        """Fork rows `sources` of the cache, feed one token per new row (draft depth `depth`), remember the
        level's state."""
        device = self.model.device
        self.cache.select(torch.tensor(sources, device=device))
        logits = self._forward(
            torch.tensor([[token] for token in tokens], device=device), rows=len(tokens), depth=depth
        )
        self._tree_levels.append((list(nodes), self.cache.snapshot()))
        return logits

    def _grow_dynamic_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, logits: torch.Tensor, policy: DynamicTreePolicy
    ) -> TokenTree:
        """EAGLE-2 style: expand the `top_k` most valuable frontier nodes per depth, rerank, keep a budget."""
        # candidate nodes in creation order: (token, parent candidate, cumulative log-prob, path)
        candidates: list[tuple[int, int, float, torch.Tensor]] = []
        frontier, values, paths = [-1], [0.0], [input_ids]
        for depth in range(policy.depth):
            new: list[int] = []
            for row, parent in enumerate(frontier):
                scores = logits[row : row + 1]
                if sampler.logits_processor:
                    scores = sampler.logits_processor(paths[row], scores.clone())
                log_probs = torch.log_softmax(scores[0].float(), dim=-1)
                best = log_probs.topk(min(policy.top_k, log_probs.shape[-1]))
                for token, log_prob in zip(best.indices.tolist(), best.values.tolist()):
                    path = torch.cat([paths[row], paths[row].new_tensor([[token]])], dim=1)
                    candidates.append((token, parent, values[row] + log_prob, path))
                    new.append(len(candidates) - 1)
            expand = sorted(new, key=lambda c: -candidates[c][2])[: policy.top_k]
            if depth == policy.depth - 1:
                break
            sources = [frontier.index(candidates[c][1]) for c in expand]
            logits = self._feed_level(sources, [candidates[c][0] for c in expand], expand, depth + 1)
            frontier = expand
            values = [candidates[c][2] for c in expand]
            paths = [candidates[c][3] for c in expand]
        # rerank every drafted node; keep the budget, closed under ancestors
        chosen: set[int] = set()
        for candidate in sorted(range(len(candidates)), key=lambda c: -candidates[c][2]):
            if len(chosen) >= policy.max_nodes:
                break
            node = candidate
            while node >= 0 and node not in chosen:
                chosen.add(node)
                node = candidates[node][1]
        order = sorted(chosen)  # creation order is topological
        index = {candidate: i for i, candidate in enumerate(order)}
        # level records refer to final node indices; nodes left out of the tree can never be accepted
        self._tree_levels = [
            ([index.get(node, -2) for node in nodes], snapshot) for nodes, snapshot in self._tree_levels
        ]
        return TokenTree(
            tokens=torch.tensor([candidates[c][0] for c in order], dtype=torch.long),
            parents=torch.tensor([index[candidates[c][1]] if candidates[c][1] >= 0 else -1 for c in order]),
        )

    def commit_tree(self, input_ids: torch.Tensor, path: list[int]) -> None:
        """The target kept tree nodes `path` (root's child first); bring the state to the kept prefix."""
        fed = [nodes for nodes, _ in self._tree_levels]
        # path nodes fed to the drafter: a leading run (a node with children was fed)
        keep = 0
        while keep < min(len(path), len(fed)) and path[keep] in fed[keep]:
            keep += 1
        self.cache.select(torch.tensor([0], device=self.model.device))
        if keep == 0:
            self.cache.restore(self._tree_root)
        elif not self.cache.attention_tensors():
            # recurrent state only: take the row that fed the deepest kept node
            nodes, snapshot = self._tree_levels[keep - 1]
            row = nodes.index(path[keep - 1])
            self.cache.restore(
                CacheSnapshot(
                    seq_length=snapshot.seq_length,
                    states=tuple(state[row : row + 1] for state in snapshot.states),
                    batch_size=1,
                )
            )
        else:
            # attention drafters: the rows' keys differ per branch; re-feed the short kept path instead
            self.cache.restore(self._tree_root)
            self._consume(input_ids[:, self._tree_root.seq_length : self._tree_root.seq_length + keep])
        self._tree_levels = []

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        if self.cache is None:
            raise RuntimeError("call begin() before commit().")
        if self._round_drafted > 0:
            # The cache holds the round's first `drafted - 1` drafts; keep the accepted ones among them.
            keep = self._round_start + min(num_accepted, self._round_drafted - 1)
            self.cache.rollback_to(keep)
        self.cache.clear_checkpoints()
        self._round_drafted = 0


def _confidence(logits: torch.Tensor, token: torch.Tensor, probs: torch.Tensor | None) -> float:
    """The drafter's probability for the `token` `[1]` it chose: from the processed `probs` `[1, V]` when
    sampling, else from the raw `logits` `[1, V]`."""
    if probs is None:
        probs = torch.softmax(logits, dim=-1)
    return float(probs[0, token[0]])


def _choose_children(
    sampler: DraftSampler, sequences: list[torch.Tensor], logits: torch.Tensor, width: int, sample: bool
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Children of each of the `R` rows (`DraftSampler.choose_children`): `R` 1-D tensors of token ids,
    and (`sample`) the `[R, V]` distributions they were drawn from."""
    chosen = [
        sampler.choose_children(sequence, logits[row : row + 1], width, sample)
        for row, sequence in enumerate(sequences)
    ]
    rows = [tokens for tokens, _ in chosen]
    distributions = [probs for _, probs in chosen]
    return rows, torch.stack(distributions) if distributions and distributions[0] is not None else None


def _check_causal_lm(model: object, role: str) -> None:
    """Raise `ValueError` unless `model` is a decoder-only transformers LM with a cache."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(
            f"the {role} must be a transformers PreTrainedModel or a hf_specssm Drafter, got {type(model).__name__}."
        )
    if model.config.is_encoder_decoder:
        raise ValueError(
            f"the {role} must be a decoder-only causal LM; {type(model).__name__} is encoder-decoder."
        )
    if model.get_output_embeddings() is None or not model.can_generate():
        raise ValueError(
            f"the {role} must be a causal LM with a language-modelling head; got {type(model).__name__}."
        )
    _compat.cache_kwarg_name(model)
