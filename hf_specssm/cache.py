"""A transformers `Cache` that speculative decoding can snapshot, roll back, fork and select.

transformers 5.x keeps SSM state in `LinearAttention*` cache layers that cannot be rolled back (their
`crop` only trims the conv window and leaves the recurrent state at its post-draft value) and cannot be
forked (`batch_repeat_interleave` is missing). `ForkableCache` keeps the same layer objects, so every
model reads and writes its state exactly as it would with a `DynamicCache`, and adds:

- `checkpoint()` / `rollback_to(length)` / `rollback(num_tokens)`: restore conv *and* recurrent state to
  any prefix that was checkpointed, and crop attention layers to the same length;
- `snapshot()` / `restore(snapshot)`: an explicit copy of the whole recurrent state;
- `fork(k)` / `select(indices)`: copy rows along the batch axis, or keep some of them;
- `get_seq_length()` that works when no attention layer exists.

Checkpoints live in a pool of preallocated state buffers: taking one is a `copy_` into a free slot, never
a reference to the live tensors (the single-step kernels update those in place).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache

from hf_specssm import _compat
from hf_specssm.kernels.state_gather import gather_rows

# checkpoint markers that own no pool slot
_NO_STATE = -1  # attention-only cache: cropping restores everything
_EMPTY_STATE = -2  # taken before the first forward: restoring means an empty recurrent state


@dataclass(frozen=True)
class CacheSnapshot:
    """A copy of a cache's recurrent state at one sequence length.

    Attributes:
        seq_length: number of tokens the cache had consumed when the snapshot was taken.
        states: clones of every initialised conv / recurrent state tensor, in `ForkableCache` layer order;
            conv states are `[B, C, K]`, recurrent states `[B, D, N]` (Mamba) or `[B, H, P, N]` (Mamba2).
        batch_size: batch size of the cache at that time.
    """

    seq_length: int
    states: tuple[torch.Tensor, ...]
    batch_size: int


class ForkableCache(DynamicCache):
    """A `DynamicCache` for attention, SSM and hybrid models that supports speculative decoding.

    Args:
        config: the model config (`layer_types` decide which layers are recurrent and which attend).

    Example:
        >>> cache = ForkableCache(model.config)
        >>> model(input_ids, cache_params=cache, use_cache=True)   # `past_key_values=` for attention models
        >>> cache.advance(input_ids.shape[1])
        >>> cache.checkpoint()                  # remember the state at this length
        >>> model(draft_ids, cache_params=cache, use_cache=True); cache.advance(draft_ids.shape[1])
        >>> cache.rollback(draft_ids.shape[1])  # back to the checkpoint, conv and SSM state included
    """

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config=config)
        # A hybrid layer with a sliding window would need past recording, which also changes how its mixer
        # updates the conv window. Keeping all keys instead is exact (the mask applies the window).
        _compat.use_full_attention_in_hybrid_layers(self)
        _compat.enable_attention_rollback(self)
        self._seen_tokens = 0
        self._has_linear = any(_compat.is_linear_layer(layer) for layer in self.layers)
        self._has_attention = any(_compat.is_attention_layer(layer) for layer in self.layers)
        # Pool of checkpoint slots: each slot holds one buffer per live state tensor.
        self._slots: list[list[torch.Tensor] | None] = []
        self._free_slots: list[int] = []
        self._checkpoints: dict[int, int] = {}
        # per-row count of real tokens in the current forward (right padding after them), or None
        self._conv_row_lengths: list[int] | None = None
        # layers whose multi-token forwards must not write their state (`frozen`), and their conv inputs
        self._frozen_layers: frozenset[int] = frozenset()
        self.frozen_conv_inputs: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ length

    @property
    def seen_tokens(self) -> int:
        """Number of tokens whose effect the cache holds."""
        return self._seen_tokens

    @property
    def has_recurrent_state(self) -> bool:
        """Whether the model keeps SSM / linear-attention state in this cache."""
        return self._has_linear

    def advance(self, num_tokens: int) -> None:
        """Record that a forward consumed `num_tokens` more tokens (the recurrent layers cannot count them)."""
        if num_tokens < 0:
            raise ValueError(f"advance() takes a non-negative count, got {num_tokens}.")
        self._seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed: the attention layers' length if the model has any, otherwise the tracked count."""
        if self._has_attention:
            try:
                return super().get_seq_length(layer_idx)
            except ValueError:
                return self._seen_tokens
        return self._seen_tokens

    @property
    def is_croppable(self) -> bool:
        """Always True: `crop` restores recurrent state from checkpoints."""
        return True

    # ------------------------------------------------------------------ state access

    def _live_state_slots(self) -> list[tuple[dict, int]]:
        slots = []
        for layer in self.layers:
            if _compat.is_linear_layer(layer):
                slots.extend(_compat.linear_state_slots(layer))
        return slots

    def _live_states(self) -> list[torch.Tensor]:
        return [store[key] for store, key in self._live_state_slots()]

    def state_tensors(self) -> list[torch.Tensor]:
        """The live recurrent state tensors (conv `[B, C, K]`, SSM `[B, D, N]` or `[B, H, P, N]`), by layer.

        These are the tensors the model updates in place; clone them to keep a copy.
        """
        return self._live_states()

    def attention_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(keys, values)` `[B, H_kv, S, D]` of every attention layer that holds tokens."""
        return [(layer.keys, layer.values) for layer in self._initialized_attention_layers()]

    def _write_states(self, states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        slots = self._live_state_slots()
        if len(slots) != len(states):
            raise RuntimeError(
                f"the cache has {len(slots)} state tensors but the saved state has {len(states)}; "
                "it was taken from a cache of another model or before the first forward."
            )
        for (store, key), saved in zip(slots, states):
            live = store[key]
            if live.shape == saved.shape:
                # In place: transformers marks these tensors as static addresses.
                live.copy_(saved)
            else:
                store[key] = saved.clone()

    def _initialized_attention_layers(self) -> list:
        return [layer for layer in self.layers if _compat.attention_holds_tokens(layer)]

    def _batch_size(self) -> int:
        states = self._live_states()
        if states:
            return states[0].shape[0]
        attention = self._initialized_attention_layers()
        return attention[0].keys.shape[0] if attention else 0

    def _crop_attention_to(self, length: int) -> None:
        for layer in self.layers:
            if not _compat.is_attention_layer(layer):
                continue
            current = layer.get_seq_length()
            if length > current:
                raise RuntimeError(f"cannot extend an attention layer from {current} to {length} tokens.")
            # `crop` on hybrid layers also trims the conv window; only their attention part is cropped here.
            _compat.crop_attention_part(layer, length - current)

    # ------------------------------------------------------------------ ragged rows

    @contextlib.contextmanager
    def ragged_conv_rows(self, lengths: list[int]) -> Iterator[None]:
        """Forwards inside this context leave each row's conv window at that row's last real token.

        Row `b` of the batch fed inside the context has `lengths[b]` real tokens followed by padding; its conv
        window must end at the last real token, not at the padding. (The SSM state is kept there by
        `mixers.identity_steps`.)
        """
        self._conv_row_lengths = list(lengths)
        try:
            yield
        finally:
            self._conv_row_lengths = None

    # ------------------------------------------------------------------ frozen layers

    @contextlib.contextmanager
    def frozen(self, layer_indices: Iterable[int]) -> Iterator[None]:
        """Inside this context, multi-token forwards read the conv and SSM state of `layer_indices` but do
        not write it: the layers keep the state from before the forward, and a commit
        (`ssm.state_replay.StateRecorder.commit`) brings them to the accepted prefix afterwards — no
        checkpoint copy, no rewind. The new conv inputs of each frozen layer (`[B, C, T]`) are kept in
        `frozen_conv_inputs` until the next `frozen` context. One-token forwards update their state in place
        (transformers' step kernels do not go through the cache), so callers freeze multi-token forwards
        only.
        """
        self._frozen_layers = frozenset(layer_indices)
        self.frozen_conv_inputs = {}
        try:
            yield
        finally:
            self._frozen_layers = frozenset()

    def update_recurrent_state(
        self, recurrent_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> torch.Tensor:
        """transformers' SSM state write, skipped for layers frozen by `frozen` (returns the new state)."""
        if layer_idx in self._frozen_layers and _compat.recurrent_state(self.layers[layer_idx]) is not None:
            return recurrent_states
        return super().update_recurrent_state(recurrent_states, layer_idx, *args, **kwargs)

    def update_conv_state(self, conv_states: torch.Tensor, layer_idx: int, *args, **kwargs) -> torch.Tensor:
        """transformers' conv-window update, with each row's window cut at its real length inside
        `ragged_conv_rows`, and nothing written for layers frozen by `frozen`. `conv_states`: `[B, C, T]`
        new conv inputs; returns `[B, C, P + T]` (window + new)."""
        if layer_idx in self._frozen_layers:
            state_idx = args[0] if args else kwargs.get("state_idx", 0)
            full = _compat.conv_inputs_without_update(self.layers[layer_idx], conv_states, state_idx)
            if full is not None:
                self.frozen_conv_inputs[layer_idx] = conv_states
                return full
        full = super().update_conv_state(conv_states, layer_idx, *args, **kwargs)
        if self._conv_row_lengths is None:
            return full
        state_idx = args[0] if args else kwargs.get("state_idx", 0)
        stored = _compat.stored_conv_state(self.layers[layer_idx], state_idx)
        width, new = stored.shape[-1], conv_states.shape[-1]
        past = full.shape[-1] - new
        for row, length in enumerate(self._conv_row_lengths):
            if length < new:
                window = full[row, :, : past + length][..., -width:]
                stored[row].zero_()
                stored[row, :, width - window.shape[-1] :] = window
        return full

    # ------------------------------------------------------------------ snapshots

    def snapshot(self) -> CacheSnapshot:
        """Copy the recurrent state (attention layers are restored by cropping, so they are not copied)."""
        return CacheSnapshot(
            seq_length=self._seen_tokens,
            states=tuple(state.clone() for state in self._live_states()),
            batch_size=self._batch_size(),
        )

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Put the cache back to `snapshot`: copy its recurrent state, crop attention layers to its length."""
        if snapshot.seq_length > self._seen_tokens:
            raise ValueError(
                f"cannot restore a snapshot at {snapshot.seq_length} tokens into a cache at {self._seen_tokens}."
            )
        self._write_states(snapshot.states)
        self._crop_attention_to(snapshot.seq_length)
        self._seen_tokens = snapshot.seq_length

    def checkpoint(self) -> None:
        """Remember the state at the current length, so `rollback_to(current length)` can return here.

        Costs one `copy_` of the recurrent state into a pooled buffer; nothing for attention-only models.
        """
        length = self._seen_tokens
        if not self._has_linear:
            self._checkpoints[length] = _NO_STATE
            return
        live = self._live_states()
        if not live:
            # before the first forward: returning here means going back to an empty recurrent state
            self._checkpoints[length] = _EMPTY_STATE
            return
        slot_idx = self._checkpoints.get(length)
        if slot_idx is None or slot_idx < 0:
            slot_idx = self._free_slots.pop() if self._free_slots else self._new_slot()
        buffers = self._slots[slot_idx]
        if (
            buffers is None
            or len(buffers) != len(live)
            or any(
                b.shape != s.shape or b.dtype != s.dtype or b.device != s.device
                for b, s in zip(buffers, live)
            )
        ):
            buffers = [torch.empty_like(state) for state in live]
            self._slots[slot_idx] = buffers
        for buffer, state in zip(buffers, live):
            buffer.copy_(state)
        self._checkpoints[length] = slot_idx

    def _new_slot(self) -> int:
        self._slots.append(None)
        return len(self._slots) - 1

    @property
    def checkpoint_lengths(self) -> list[int]:
        """Sequence lengths that `rollback_to` can return to."""
        return sorted(self._checkpoints)

    def rollback_to(self, length: int) -> None:
        """Return to `length` consumed tokens, which must be the current length or a checkpointed one.

        Attention layers are cropped; conv and recurrent states are copied back from the checkpoint.
        Checkpoints past `length` are dropped, the one at `length` is kept.
        """
        if length == self._seen_tokens:
            self._drop_checkpoints_after(length)
            return
        if length > self._seen_tokens or length < 0:
            raise ValueError(f"cannot roll back to {length} tokens from {self._seen_tokens}.")
        if self._has_linear:
            slot_idx = self._checkpoints.get(length)
            if slot_idx is None:
                raise ValueError(
                    f"no checkpoint at {length} tokens (have {self.checkpoint_lengths}); "
                    "recurrent state cannot be un-consumed without one."
                )
            self._load_slot(slot_idx)
        self._crop_attention_to(length)
        self._seen_tokens = length
        self._drop_checkpoints_after(length)

    def rewind_recurrent(self, length: int) -> None:
        """Copy the recurrent state of the checkpoint at `length` back, leaving attention layers and the
        token count alone (Activation Replay then advances the recurrent layers and calls `set_length`)."""
        if not self._has_linear:
            return
        slot_idx = self._checkpoints.get(length)
        if slot_idx is None:
            raise ValueError(f"no checkpoint at {length} tokens (have {self.checkpoint_lengths}).")
        self._load_slot(slot_idx)

    def _load_slot(self, slot_idx: int) -> None:
        if slot_idx == _EMPTY_STATE:
            for layer in self.layers:
                if _compat.is_linear_layer(layer):
                    # only the recurrent part: hybrid layers keep their keys (cropped separately)
                    _compat.reset_recurrent_part(layer)
            return
        self._write_states(self._slots[slot_idx])

    def crop_attention(self, length: int) -> None:
        """Crop every attention layer to `length` tokens (recurrent layers are left alone)."""
        self._crop_attention_to(length)

    def set_length(self, length: int) -> None:
        """Declare that the cache now holds `length` tokens; checkpoints past it are dropped."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}.")
        self._seen_tokens = length
        self._drop_checkpoints_after(length)

    def checkpoint_bytes(self) -> int:
        """Bytes held by the checkpoint pool."""
        return sum(buffer.numel() * buffer.element_size() for slot in self._slots if slot for buffer in slot)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` tokens (see `rollback_to`)."""
        if num_tokens < 0:
            raise ValueError(f"rollback() takes a non-negative count, got {num_tokens}.")
        self.rollback_to(self._seen_tokens - num_tokens)

    def _drop_checkpoints_after(self, length: int) -> None:
        for key in [key for key in self._checkpoints if key > length]:
            slot_idx = self._checkpoints.pop(key)
            if slot_idx >= 0:
                self._free_slots.append(slot_idx)

    def clear_checkpoints(self) -> None:
        """Forget every checkpoint (their buffers stay in the pool for reuse)."""
        for slot_idx in self._checkpoints.values():
            if slot_idx >= 0:
                self._free_slots.append(slot_idx)
        self._checkpoints.clear()

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' `crop`: a negative count removes that many tokens (through `rollback`)."""
        if tokens_to_remove > 0:
            raise ValueError("crop() takes a negative number of tokens to remove, as in transformers 5.")
        self.rollback(-tokens_to_remove)

    # ------------------------------------------------------------------ batch axis

    @classmethod
    def stack(cls, config: PretrainedConfig, caches: list[ForkableCache]) -> ForkableCache:
        """One batch from batch-1 caches of the same model (ragged rows).

        Recurrent states are concatenated along the batch axis; a row that has consumed no token yet gets
        a zero state, which is what the mixers start from anyway. Attention keys/values are left-padded
        with zeros to the longest row: the caller masks those positions (`[B, S]` attention mask).
        """
        batch = cls(config)
        template = next((cache for cache in caches if cache.state_tensors()), None)
        for idx, layer in enumerate(batch.layers):
            rows = [cache.layers[idx] for cache in caches]
            if _compat.is_linear_layer(layer) and template is not None:
                _compat.stack_recurrent_rows(layer, rows, template.layers[idx])
            if _compat.is_attention_layer(layer):
                filled = [row for row in rows if _compat.attention_holds_tokens(row)]
                if not filled:
                    continue
                longest = max(row.keys.shape[2] for row in filled)
                keys, values = [], []
                for row in rows:
                    length = row.keys.shape[2] if row in filled else 0
                    pad_shape = (1, filled[0].keys.shape[1], longest - length, filled[0].keys.shape[3])
                    pad = filled[0].keys.new_zeros(pad_shape)
                    keys.append(torch.cat([pad, row.keys], dim=2) if length else pad)
                    values.append(torch.cat([pad, row.values], dim=2) if length else pad)
                _compat.set_attention_tensors(layer, torch.cat(keys, dim=0), torch.cat(values, dim=0))
        batch._seen_tokens = max(cache.seen_tokens for cache in caches)
        return batch

    def realign_rows(self, starts: torch.Tensor, ends: torch.Tensor) -> None:
        """Keep attention positions `[starts[b], ends[b])` of every row, right-aligned (left padding).

        After a ragged verification each row keeps a different number of tokens; this gathers each row's
        kept span to the end of a `max(ends - starts)`-long sequence axis. Positions before a row's span
        hold stale keys and must be masked by the caller.
        """
        new_length = int((ends - starts).max())
        offsets = torch.arange(new_length, device=ends.device)
        source = (ends[:, None] - new_length + offsets[None]).clamp_min(0)  # [B, S']
        for layer in self._initialized_attention_layers():
            index = source.to(layer.keys.device)[:, None, :, None]
            layer.keys = layer.keys.gather(2, index.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
            layer.values = layer.values.gather(
                2, index.expand(-1, layer.values.shape[1], -1, layer.values.shape[3])
            )

    def keep_positions(self, positions: torch.Tensor) -> None:
        """Keep only sequence positions `positions` of every initialised attention layer's keys and values.

        A tree round keeps the cached prefix, the fed chain and one root-to-node path, which `crop` (a
        suffix) cannot express; recurrent layers are left alone (their state is committed separately).

        Args:
            positions: `[S']` strictly ascending long positions, counted from the first cached token.
        """
        _compat.keep_attention_positions(self, torch.as_tensor(positions, dtype=torch.long))

    def select(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (a 1-D long tensor, repeats allowed) of every layer, in that order.

        Checkpoints are dropped: they describe rows that no longer exist.
        """
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim != 1:
            raise ValueError(f"select() takes a 1-D index tensor, got shape {tuple(indices.shape)}.")
        batch = self._batch_size()
        if batch and indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= batch):
            raise ValueError(f"row indices {indices.tolist()} are out of range for batch size {batch}.")
        for store, key in self._live_state_slots():
            store[key] = gather_rows(store[key], indices.to(store[key].device))
        for layer in self._initialized_attention_layers():
            layer.keys = gather_rows(layer.keys, indices.to(layer.keys.device))
            layer.values = gather_rows(layer.values, indices.to(layer.values.device))
        self.clear_checkpoints()
        self._slots = []
        self._free_slots = []

    def fork(self, repeats: int) -> None:
        """Repeat each row `repeats` times along the batch axis (row b becomes rows b*repeats … b*repeats+repeats-1)."""
        if repeats < 1:
            raise ValueError(f"fork() needs repeats >= 1, got {repeats}.")
        batch = self._batch_size()
        self.select(torch.arange(batch).repeat_interleave(repeats))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """transformers' name for `fork`."""
        self.fork(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """transformers' name for `select`."""
        self.select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """transformers' beam reordering, through `select`."""
        self.select(beam_idx)

    def reset(self) -> None:
        """Drop all state: the next forward starts from an empty cache."""
        super().reset()
        self._seen_tokens = 0
        self.clear_checkpoints()
