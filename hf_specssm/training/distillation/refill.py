"""Answers generated with a batch that refills: a finished row's slot takes the next task at once.

`generate.answer_batch` runs one `generate` call per batch, so every batch decodes until its longest answer
ends: with the target's answers (152 tokens on average, 29% of them cut at 256) a batch of 32 keeps about
59% of its rows busy. Here the target decodes one token for every row in flight each step, and a row
whose answer ended leaves the batch; the next tasks are prefilled (each alone, so no pad is computed) and
joined to the batch's cache, aligned on its last column (`_compat.attention`). Each row keeps
its own position ids and a padding mask over the shared columns, so its logits are what decoding it alone
computes (to float tolerance); leading columns that no row reads any more are dropped.

Records, extras and their format are those of `generate.answer_batch`: a record's extras file holds the
rows of the group of answers it was written with. A sampled answer draws from its own generator, seeded by
its task id, so the answer does not depend on the rows it shared the batch with (up to float noise in the
logits). Targets whose cache is not plain full attention (sliding windows, recurrent layers) keep
`generate.run_tasks`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

from hf_specssm._compat.attention import (
    concat_attention_rows,
    is_plain_attention_cache,
    map_attention_tensors,
)
from hf_specssm.training.distillation.generate import MODES, Task, _end_ids, _seed, final_norm, store_answers
from hf_specssm.training.distillation.store import DistillStore

# the next tasks join once this share of the batch's slots is free (one prefill serves several rows)
ADMIT_SHARE = 1 / 8

TaskSupply = Sequence[Task] | Callable[[set[str]], Sequence[Task]]


def refill_problem(target: torch.nn.Module) -> str | None:
    """Why `target` cannot decode with a refilling batch (then `generate.run_tasks` is used), or `None`."""
    try:
        cache = DynamicCache(config=target.config)
    except (TypeError, ValueError) as error:
        return f"its cache cannot be built from its config ({error})"
    if not is_plain_attention_cache(cache):
        kinds = sorted({type(layer).__name__ for layer in cache.layers})
        return f"its cache layers are {', '.join(kinds) or 'none'}, not plain full attention"
    return None


class _Row:
    """One answer in flight: its task, tokens so far and what was captured at each of them."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        self.tokens: list[int] = []
        self.topk_ids: list[torch.Tensor] = []
        self.topk_logp: list[torch.Tensor] = []
        self.hidden: list[torch.Tensor] = []
        self.finished = False
        self.done = False
        self.temperature = MODES[task.mode]
        self.generator = None
        if self.temperature is not None:
            self.generator = torch.Generator(device=device).manual_seed(_seed([task.id]))

    @property
    def next_position(self) -> int:
        """The position id of the last chosen token, which the next step feeds."""
        return len(self.task.prompt_ids) + len(self.tokens) - 1


class RefillDecoder:
    """Rows decoding together in one batch whose finished rows leave and whose free slots take new tasks.

    Args:
        target: a causal LM whose cache is plain full attention (see `refill_problem`).
        tokenizer: its tokenizer (end ids).
        max_new_tokens: answer tokens per row at most.
        top_k: soft-label entries kept per answer token.
        hidden: keep the last hidden state that chose each answer token.
    """

    def __init__(self, target, tokenizer, max_new_tokens: int, top_k: int = 8, hidden: bool = True) -> None:
        problem = refill_problem(target)
        if problem is not None:
            raise ValueError(f"{type(target).__name__} cannot decode with a refilling batch: {problem}.")
        self.target = target
        self.max_new_tokens = max_new_tokens
        self.top_k = top_k
        self.keep_hidden = hidden
        self.device = next(target.parameters()).device
        self.end_ids = _end_ids(target, tokenizer)
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        # [B, S] 1 where a row reads a column of the shared cache
        self.mask: torch.Tensor | None = None
        self._captured: list[torch.Tensor] = []

    @torch.no_grad()
    def admit(self, tasks: Sequence[Task]) -> None:
        """Prefill `tasks` and join them to the batch; each takes its first answer token.

        Each prompt is prefilled alone (a padded batch of prompts computes every pad: 2,320 prompt tokens
        of 32 chats took 49 s as one batch on this CPU), then the caches are joined, aligned on their
        last column.
        """
        if not tasks:
            return
        cache = DynamicCache(config=self.target.config)
        logits, states = [], []
        for task in tasks:
            prompt = torch.tensor([task.prompt_ids])
            alone = DynamicCache(config=self.target.config)
            row_logits, row_hidden = self._forward(
                prompt, torch.ones_like(prompt), torch.arange(prompt.shape[1])[None], alone
            )
            concat_attention_rows(cache, alone)
            logits.append(row_logits)
            states.append(row_hidden)
        width = max(len(task.prompt_ids) for task in tasks)
        mask = torch.zeros((len(tasks), width), dtype=torch.long, device=self.device)
        for row, task in enumerate(tasks):
            mask[row, width - len(task.prompt_ids) :] = 1
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            concat_attention_rows(self.cache, cache)
            span = max(self.mask.shape[1], width)
            self.mask = torch.cat([_left_pad(self.mask, span), _left_pad(mask, span)])
        new_rows = [_Row(task, self.device) for task in tasks]
        self.rows += new_rows
        hidden = torch.cat(states) if self.keep_hidden else None
        self._take(new_rows, torch.cat(logits), hidden)

    @torch.no_grad()
    def step(self) -> None:
        """Feed every row its last token and take the next one."""
        input_ids = torch.tensor([[row.tokens[-1]] for row in self.rows], device=self.device)
        positions = torch.tensor([[row.next_position] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits, hidden = self._forward(input_ids, self.mask, positions, self.cache)
        self._take(self.rows, logits, hidden)

    def retire(self) -> list[_Row]:
        """Remove the rows whose answer ended (and the columns no row reads any more); return them."""
        done = [row for row in self.rows if row.done]
        if not done:
            return []
        kept = [index for index, row in enumerate(self.rows) if not row.done]
        self.rows = [self.rows[index] for index in kept]
        if not kept:
            self.cache = self.mask = None
            return done
        index = torch.tensor(kept, device=self.device)
        self.mask = self.mask.index_select(0, index)
        # the first column any row still reads: the columns before it go
        first = int(self.mask.argmax(dim=1).min())
        self.mask = self.mask[:, first:]
        map_attention_tensors(self.cache, lambda tensor: tensor.index_select(0, index)[:, :, first:])
        return done

    def _forward(
        self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`[n, V]` float logits at each row's last position and `[n, H]` hidden states there (or None)."""
        self._captured.clear()
        handle = final_norm(self.target).register_forward_hook(self._on_hidden) if self.keep_hidden else None
        try:
            output = self.target(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            if handle is not None:
                handle.remove()
        hidden = self._captured[-1] if self.keep_hidden else None
        return output.logits[:, -1].float(), hidden

    def _on_hidden(self, module, args, output) -> None:
        self._captured.append(output[:, -1])

    def _take(self, rows: list[_Row], logits: torch.Tensor, hidden: torch.Tensor | None) -> None:
        """Each row's next token from its `[V]` logits (argmax, or a draw at its temperature), with the
        top-k log-probabilities (temperature 1) and hidden state kept."""
        logp = logits.log_softmax(-1)
        values, indices = logp.topk(self.top_k, dim=-1)
        values, indices = values.to(torch.float16).cpu(), indices.to(torch.int32).cpu()
        states = hidden.to(torch.float16).cpu() if hidden is not None else None
        chosen = logits.argmax(-1).tolist()
        for index, row in enumerate(rows):
            if row.temperature is not None:
                chosen[index] = _draw(logits[index], row.temperature, row.generator)
            token = chosen[index]
            row.tokens.append(token)
            row.topk_ids.append(indices[index])
            row.topk_logp.append(values[index])
            if states is not None:
                row.hidden.append(states[index])
            if token in self.end_ids:
                row.finished = row.done = True
            elif len(row.tokens) >= self.max_new_tokens:
                row.done = True


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> int:
    """One token drawn from `softmax(logits / temperature)` (`[V]` logits) by inverting its distribution
    function with one uniform draw (`torch.multinomial` draws an exponential per vocabulary entry: 3 ms a
    row over 151k entries here, 7% of a step of 32 rows)."""
    cdf = (logits / temperature).softmax(-1).cumsum(-1)
    point = torch.rand((1,), generator=generator, device=logits.device) * cdf[-1]
    return min(int(torch.searchsorted(cdf, point, right=True)), logits.shape[-1] - 1)


def _left_pad(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


def write_answers(store: DistillStore, rows: Sequence[_Row], dtype_name: str) -> int:
    """Store finished rows as one group (`generate.store_answers`). Returns answer tokens."""
    arrays = {
        "topk_ids": torch.stack([entry for row in rows for entry in row.topk_ids]).numpy(),
        "topk_logp": torch.stack([entry for row in rows for entry in row.topk_logp]).numpy(),
    }
    if rows[0].hidden:
        arrays["hidden"] = torch.stack([entry for row in rows for entry in row.hidden]).numpy()
    tasks = [row.task for row in rows]
    answers = [row.tokens for row in rows]
    return store_answers(store, "r", tasks, answers, [row.finished for row in rows], arrays, dtype_name)


def run_tasks_refill(
    target,
    tokenizer,
    tasks: TaskSupply,
    store: DistillStore,
    batch_size: int,
    max_new_tokens: int,
    shard_records: int,
    deadline: float | None = None,
    top_k: int = 8,
    hidden: bool = True,
    dtype_name: str = "fp32",
    on_batch: Callable[[int, int, float], None] | None = None,
) -> tuple[int, int, float]:
    """Answer tasks with a refilling batch of `batch_size` rows until done or past `deadline`.

    Past the deadline no task joins and the rows in flight finish. Every `batch_size` finished answers are
    stored as one group (and the open shard sealed when it holds `shard_records`); an interrupt stores the
    answers finished so far.

    Args:
        tasks: the tasks in order, or a function that, given the ids in flight, returns the next ones
            (empty: none left); it is called whenever the queue runs dry, after the finished answers are
            stored.
        on_batch: called after each stored group with `(answers in it, answer tokens so far, seconds)`.

    Returns:
        `(answers, answer tokens, seconds)` of this call.
    """
    started = time.monotonic()
    decoder = RefillDecoder(target, tokenizer, max_new_tokens, top_k=top_k, hidden=hidden)
    supply = tasks if callable(tasks) else None
    queue: deque[Task] = deque(() if callable(tasks) else tasks)
    finished: list[_Row] = []
    counts = {"answers": 0, "tokens": 0}
    admit_at = max(1, round(batch_size * ADMIT_SHARE))

    def store_finished() -> None:
        if not finished:
            return
        counts["tokens"] += write_answers(store, finished, dtype_name)
        counts["answers"] += len(finished)
        store.seal(min_records=shard_records)
        if on_batch is not None:
            on_batch(len(finished), counts["tokens"], time.monotonic() - started)
        finished.clear()

    try:
        while True:
            admitting = deadline is None or time.monotonic() < deadline
            if admitting and not queue and supply is not None:
                store_finished()
                queue.extend(supply({row.task.id for row in decoder.rows}))
                if not queue:
                    supply = None
            free = batch_size - len(decoder.rows)
            if admitting and queue and (free >= min(admit_at, len(queue)) or not decoder.rows):
                decoder.admit([queue.popleft() for _ in range(min(free, len(queue)))])
            finished += decoder.retire()
            if len(finished) >= batch_size:
                store_finished()
            if not decoder.rows:
                if admitting and (queue or supply is not None):
                    continue
                break
            decoder.step()
            finished += decoder.retire()
    finally:
        store_finished()
    return counts["answers"], counts["tokens"], time.monotonic() - started
