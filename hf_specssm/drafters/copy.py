"""A model drafter that also copies from the context: model drafts and prompt-lookup drafts in one round.

Small recurrent drafters are weak exactly where targets are most predictable: repeating a span of the
context (a function stub in a coding answer, numbers and names in a word problem, phrases of an article
being summarised). A fixed-size state cannot hold every earlier token, while an n-gram lookup finds
the span at once. `ContextCopyDrafter` combines the two:

- **trees**: the prompt-lookup continuation is grafted onto the model's tree as one more branch
  (merged where it agrees with the model's own nodes), so the target verifies both in the same forward;
- **chains**: a round drafts the lookup continuation when the context has a match of at least
  `min_copy` tokens, and the model's chain otherwise (`chain_rounds="either"`). Copy rounds are judged
  on their own: the lookup drafter's `DraftGate` compares the tokens per second of rounds that copied
  with those of rounds that did not, and stops copying (probing now and then) while copies lose, as on
  text whose short n-gram matches do not continue the way the target does; the model drafter's own gate
  and length policy learn from the model's rounds only.
- **both branches** (`chain_rounds="both"`, where the target verifies trees): a round with a match
  drafts the model's chain *and* the copy and verifies them as the two branches of one tree (merged
  where they agree), so a copy that does not continue costs a few more verified tokens instead of the
  model's round, and a model that drafts well no longer competes with copies for the round. Rounds
  without a match stay chains. The gate then judges rounds with the copy branch against rounds
  without one. Where every verified token costs (a 2-core CPU: ~1% of a forward each), the extra
  branch costs more than it adds: it measured 3–9% slower than `"either"` on the real pair
  (docs/benchmarks.md, "Two branches per round"); it is meant for targets whose verification is flat in
  the tokens it scores.

Lossless either way: copied tokens are deterministic drafts (one-hot proposals when sampling), and the
model's drafter state is rolled back to the part of the accepted path it drafted itself; the rest is
fed to it at the start of the next round like any committed tokens.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from hf_specssm.config import DraftConfig
from hf_specssm.drafters.base import Draft, Drafter, DraftSampler, RoundOutcome, RoundPlan, TreeDrafter
from hf_specssm.drafters.ngram import PromptLookupDrafter
from hf_specssm.tree import TokenTree

#: How `ContextCopyDrafter` drafts chain rounds with a match: the copy or the model's chain, or both as a tree.
CHAIN_ROUNDS = ("either", "both")


class ContextCopyDrafter(TreeDrafter):
    """A model drafter plus prompt lookup: trees get the lookup continuation as an extra branch, chains
    draft it instead of the model when the context has a long enough match.

    Args:
        drafter: the model drafter — a `ModelDrafter` (Mamba or Transformer draft model) or a draft head
            (`ReDrafterDrafter`; with one beam it drafts chains) — whose config, tree shape or tree policy
            and draft-length schedule apply to the model's drafts.
        lookup: the prompt-lookup drafter that finds the continuation (default: n-grams of 3 down to 2
            tokens, 12 tokens copied); its length policy sets a chain round's copy length and its gate
            decides whether chain rounds copy at all.
        min_copy: a chain round copies only a continuation of at least this many tokens.
        chain_rounds: `"either"`: a chain round drafts the copy or the model's chain; `"both"`: a round
            whose context has a match verifies the model's chain and the copy as one two-branch tree
            (chains where the target cannot verify trees, and where the model samples its chain, since a
            deterministic copy cannot join a sampled draft's distributions).

    Attributes:
        last_round_copied: whether the last chain round drafted the lookup continuation (two-branch
            rounds: whether the copy added nodes to the model's chain).
        copied_rounds: rounds whose draft contained a copied continuation (chains and trees).
    """

    def __init__(
        self,
        drafter: TreeDrafter,
        lookup: PromptLookupDrafter | None = None,
        min_copy: int = 2,
        chain_rounds: str = "either",
    ) -> None:
        if not isinstance(drafter, TreeDrafter) or isinstance(
            drafter, (PromptLookupDrafter, ContextCopyDrafter)
        ):
            raise ValueError(
                "drafter must be a model drafter (a ModelDrafter, or a draft head's ReDrafterDrafter), got "
                f"{type(drafter).__name__}."
            )
        if not isinstance(min_copy, int) or min_copy < 1:
            raise ValueError(f"min_copy must be an integer >= 1, got {min_copy!r}.")
        if chain_rounds not in CHAIN_ROUNDS:
            raise ValueError(f"chain_rounds must be one of {CHAIN_ROUNDS}, got {chain_rounds!r}.")
        self.inner = drafter
        self.lookup = (
            lookup
            if lookup is not None
            else PromptLookupDrafter(max_ngram_size=3, min_ngram_size=2, num_draft_tokens=12)
        )
        self.min_copy = min_copy
        self.chain_rounds = chain_rounds
        self.config: DraftConfig = drafter.config
        # the model drafter's policies decide the rounds; copy rounds do not train them (`observe_round`)
        self.length_policy = drafter.length_policy
        self.tree_policy = drafter.tree_policy
        self.draft_gate = None  # the two drafters' own gates judge their rounds (`begin` starts both)
        self.last_round_copied = False
        self.copied_rounds = 0
        # this round's plans of the model drafter and of the copy (`None` before the first plan)
        self._model_plan: RoundPlan | None = None
        self._copy_plan: RoundPlan | None = None
        # the committed sequence the next round starts from (`begin`, then each commit), `[1, L]`
        self._sequence: torch.Tensor | None = None
        # a two-branch round (`chain_rounds="both"`): the copy planned for it, then how many of the tree's
        # first nodes are the model's chain (`None` otherwise)
        self._branch_copy: list[int] | None = None
        self._branch_model_nodes: int | None = None
        # the last two-branch round: the node of each copied token, and how many of the model's chain
        # nodes and of the copy's nodes the target kept
        self._branch_copy_nodes: list[int] = []
        self._branch_accepted = self._branch_copy_accepted = 0
        # set in a call whose model chains are sampled: its rounds draft the copy or the chain again
        self._sampled_chains = False

    @property
    def vocab_size(self) -> int | None:
        return self.inner.vocab_size

    @property
    def device(self) -> torch.device | None:
        return self.inner.device

    @property
    def max_tree_depth(self) -> int | None:
        """The model drafter's tree depth (`None` with fixed shapes)."""
        return self.inner.max_tree_depth

    @property
    def wants_target_hidden(self) -> bool:
        """Whether the model drafter reads the target's hidden state (`FeatureDrafter`)."""
        return self.inner.wants_target_hidden

    @property
    def target_hidden_optional(self) -> bool:
        """Whether the model drafter also drafts without hidden states."""
        return self.inner.target_hidden_optional

    def observe_target_hidden(self, hidden: torch.Tensor) -> None:
        self.inner.observe_target_hidden(hidden)

    def validate_for(self, target) -> None:
        self.inner.validate_for(target)

    def check_round_support(self, tree_problem: str | None) -> None:
        self.inner.check_round_support(tree_problem)

    def plan_round(self, room: int, tree_problem: str | None) -> RoundPlan:
        """The model drafter's plan; for chain rounds also the copy's (the lookup's length, or 0 while its
        gate is closed), and a round long enough for either — or, with `chain_rounds="both"` and a match of
        `min_copy` tokens or more in the committed sequence, a tree round holding both."""
        self.last_round_copied = False
        self._branch_copy = self._branch_model_nodes = None
        plan = self.inner.plan_round(room, tree_problem)
        if plan.tree:
            # trees graft the copy onto the model's tree and are judged as one proposal
            self._model_plan, self._copy_plan = plan, None
            return plan
        # a chain plan from the lookup's own policies, whatever trees it might shape on its own
        copy_tokens = Drafter.plan_round(self.lookup, room, None).num_tokens
        if copy_tokens > 0:
            # the gate's probes ask for one token; a copy needs `min_copy` to count as one
            copy_tokens = max(copy_tokens, min(self.min_copy, room - 1))
        self._model_plan, self._copy_plan = plan, RoundPlan(num_tokens=copy_tokens)
        if (
            self.chain_rounds == "both"
            and tree_problem is None
            and plan.num_tokens > 0
            and copy_tokens > 0
            and self._sequence is not None
            and not self._sampled_chains
        ):
            copied = self._copy(self._sequence, None, min(copy_tokens, room - 1))
            if len(copied) >= self.min_copy:
                self._branch_copy = copied
                return RoundPlan(tree=True)
        return RoundPlan(num_tokens=max(plan.num_tokens, copy_tokens))

    def observe_round(self, plan: RoundPlan, outcome: RoundOutcome) -> None:
        model_plan, copy_plan = self._model_plan, self._copy_plan
        if self._branch_model_nodes == 0:
            # a two-branch round without a model branch verified the copy alone: a copy round
            self.lookup.observe_round(copy_plan, outcome)
            return
        if self._branch_model_nodes is not None:
            # a two-branch round: the copy's policies see a round with the copy branch (what the copy drafted
            # and kept; its gate, the round's tokens per second), or without one where the copy added no
            # node; the model's policies what its own chain did (its accepted prefix, and the tokens that
            # chain alone would have committed)
            if self.last_round_copied:
                copy_outcome = dataclasses.replace(
                    outcome, drafted=len(self._branch_copy_nodes), accepted=self._branch_copy_accepted
                )
                self.lookup.observe_round(copy_plan, copy_outcome)
            else:
                self.lookup.observe_round(RoundPlan(), dataclasses.replace(outcome, drafted=0, accepted=0))
            kept = self._branch_accepted
            self.inner.observe_round(
                model_plan,
                dataclasses.replace(
                    outcome,
                    drafted=self._branch_model_nodes,
                    accepted=kept,
                    committed=min(outcome.committed, kept + 1),
                ),
            )
            return
        if plan.tree or copy_plan is None:
            self.inner.observe_round(plan, outcome)
            return
        if self.last_round_copied:
            # a copy round says nothing about the model's drafts: only the copy's policies learn from it
            self.lookup.observe_round(copy_plan, outcome)
            return
        # for the copy's gate, a round that did not copy is the alternative to copying
        self.lookup.observe_round(RoundPlan(), dataclasses.replace(outcome, drafted=0, accepted=0))
        self.inner.observe_round(model_plan, outcome)

    def spawn(self) -> ContextCopyDrafter:
        clone = copy.copy(self)
        clone.inner, clone.lookup = self.inner.spawn(), self.lookup.spawn()
        return clone

    def begin(self, input_ids: torch.Tensor) -> None:
        self.inner.begin_sequence(input_ids)  # and their gates: each reads this prompt in its first draft
        self.lookup.begin_sequence(input_ids)
        self.last_round_copied = False
        self._sequence = input_ids
        self._branch_copy = self._branch_model_nodes = None
        self._sampled_chains = False

    def end(self) -> None:
        self.inner.end()
        self.lookup.end()
        self._sequence = None

    def _copy(
        self, input_ids: torch.Tensor, sampler: DraftSampler | None, num_tokens: int | None = None
    ) -> list[int]:
        """The lookup continuation of `input_ids` (empty without a match), at most `num_tokens` long
        (default: the lookup's `num_draft_tokens`)."""
        if num_tokens is None:
            num_tokens = self.lookup.config.num_draft_tokens
        if num_tokens < 1:
            return []
        return self.lookup.draft(input_ids, num_tokens, sampler).tokens[0].tolist()

    @torch.no_grad()
    def draft(self, input_ids: torch.Tensor, num_tokens: int, sampler: DraftSampler) -> Draft:
        """The copy when this round may copy and the context has a match of `min_copy` tokens or more,
        else the model's chain of its planned length (none while its gate is closed); `[1, ≤ num_tokens]`
        after `plan_round` (a call without one copies up to the lookup's `num_draft_tokens`)."""
        planned = self._copy_plan is not None
        copy_tokens = min(num_tokens, self._copy_plan.num_tokens) if planned else None
        copied = self._copy(input_ids, sampler, copy_tokens)
        self.last_round_copied = len(copied) >= self.min_copy
        if self.last_round_copied:
            self.copied_rounds += 1
            return Draft(tokens=input_ids.new_tensor([copied]))
        model_tokens = min(num_tokens, self._model_plan.num_tokens) if planned else num_tokens
        if model_tokens < 1:
            return Draft(tokens=input_ids.new_empty((1, 0)))
        return self.inner.draft(input_ids, model_tokens, sampler)

    def commit(self, input_ids: torch.Tensor, num_accepted: int) -> None:
        # after a copy round the model drafter has drafted nothing: it reads the new tokens next round
        if not self.last_round_copied:
            self.inner.commit(input_ids, num_accepted)
        self._sequence = input_ids

    @torch.no_grad()
    def draft_tree(
        self, input_ids: torch.Tensor, sampler: DraftSampler, shape: tuple[int, ...] | None = None
    ) -> TokenTree:
        """The model's tree with the lookup continuation grafted on (model nodes keep their indices).

        Trees whose children were sampled (`tree_children="sample"`) carry the distributions they were
        drawn from; a deterministic copy cannot join them, so they are returned as they are.
        """
        if self._branch_copy is not None:
            # the match found when the round was planned, in the sequence the round drafts from
            return self._two_branches(input_ids, sampler, self._branch_copy)
        tree = self.inner.draft_tree(input_ids, sampler, shape)
        copied = self._copy(input_ids, sampler)
        if not copied or tree.draft_probs is not None:
            return tree
        grafted, _ = self._graft(tree, copied)
        if grafted is not tree:
            self.copied_rounds += 1
        return grafted

    def _two_branches(self, input_ids: torch.Tensor, sampler: DraftSampler, copied: list[int]) -> TokenTree:
        """A `chain_rounds="both"` round: the model's chain (nodes `0 … n - 1`) with `copied` grafted on.

        A sampled chain (drafted with its distributions, `Draft.probs`) cannot share a tree with a
        deterministic copy: the round then verifies the copy alone (the model drafter is rolled back at
        the commit), and the rest of the call drafts the copy or the chain (`chain_rounds="either"`).
        """
        chain = self.inner.draft(input_ids, self._model_plan.num_tokens, sampler)
        if chain.probs is not None:
            self._sampled_chains = True
            chain = Draft(tokens=chain.tokens[:, :0])
        self._branch_model_nodes = chain.length
        tree = TokenTree.chain(chain.tokens[0].cpu())
        grafted, self._branch_copy_nodes = self._graft(tree, copied)
        self.last_round_copied = grafted is not tree
        self.copied_rounds += self.last_round_copied
        return grafted

    @staticmethod
    def _graft(tree: TokenTree, copied: list[int]) -> tuple[TokenTree, list[int]]:
        """`tree` with the path `copied` added from the root, sharing the nodes it agrees with (new nodes
        numbered after the tree's; `tree` itself when every copied token is already a node), and the node
        of each copied token."""
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        children: dict[int, dict[int, int]] = {}
        for node, (token, parent) in enumerate(zip(tokens, parents)):
            children.setdefault(parent, {})[token] = node
        node, grafted, nodes = -1, False, []
        for token in copied:
            child = children.get(node, {}).get(token)
            if child is None:
                tokens.append(token)
                parents.append(node)
                child = len(tokens) - 1
                children.setdefault(node, {})[token] = child
                grafted = True
            node = child
            nodes.append(node)
        if not grafted:
            return tree, nodes
        return TokenTree(tokens=torch.tensor(tokens), parents=torch.tensor(parents)), nodes

    def commit_tree(self, input_ids: torch.Tensor, path: list[int]) -> None:
        """Keep `path`; the model drafter keeps the leading part it fed itself (grafted nodes are not in
        its records), and reads the rest of the committed tokens next round."""
        self._sequence = input_ids
        if self._branch_model_nodes is None:
            self.inner.commit_tree(input_ids, path)
            return
        # a two-branch round: the model's chain holds the tree's first nodes
        model_nodes = list(range(self._branch_model_nodes))
        self._branch_accepted = _common_prefix(path, model_nodes)
        self._branch_copy_accepted = _common_prefix(path, self._branch_copy_nodes)
        self.inner.commit(input_ids, self._branch_accepted)


def _common_prefix(path: list[int], nodes: list[int]) -> int:
    """How many leading entries `path` and `nodes` share."""
    count = 0
    while count < min(len(path), len(nodes)) and path[count] == nodes[count]:
        count += 1
    return count
