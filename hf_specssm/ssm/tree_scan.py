"""Tree verification on SSM and hybrid targets (STree): every node's output from the committed state.

A verification forward feeds `[chain, tree nodes]`. Seen from the SSM layers, its positions form a tree
rooted at the committed state: chain positions follow each other, and each node hangs off its parent (the
last chain position for children of the root). Inside `tree_verification(model, cache, parents)` each SSM
mixer's `forward` is swapped for a tree-aware one (a scoped patch, `_compat.replaced_forwards`), in one
place per mixer family; a family is admitted by its probe (`_compat.probes`, `MixerSupport.tree_scan`):

- **conv**: each position's depthwise window is its own `K − 1` nearest ancestors and itself; above the
  first position the cached conv window fills in;
- **SSM**: Mamba2-family mixers (Mamba2, Bamba, Falcon-H1, Zamba2, NemotronH, GraniteMoeHybrid) run one
  masked single-chunk SSD with the ancestor mask in place of the causal mask (`hf_specssm.kernels.tree_scan`);
  Mamba v1-family mixers (Mamba, FalconMamba, Jamba) have a per-channel, per-state decay, so they scan the
  tree level by level (`tree_scan_diagonal`);
- gating, norms, multipliers and projections exactly as the mixer does them.

The tree forward reads the committed conv and SSM state and writes neither. Attention layers of hybrids
get the tree's 4D mask and positions from `compile_tree` in the same forward. After acceptance,
`TreeScanRecord.commit` brings every SSM layer to the end of the accepted path by Activation Replay of the
inputs recorded in the forward (the conv inputs and `x, Δ, B` of the path's positions), through the N-step
state update kernel (`hf_specssm.kernels.ssm_state_update`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from hf_specssm import _compat
from hf_specssm._compat import admission
from hf_specssm.kernels.cpu import depthwise_conv, use_cpu_kernels
from hf_specssm.kernels.ssm_state_update import selective_state_update_nstep
from hf_specssm.kernels.tree_scan import tree_scan, tree_scan_diagonal
from hf_specssm.ssm import state_replay
from hf_specssm.ssm.mixers import exact_continuation, ssm_mixers
from hf_specssm.tree import TokenTree

MAMBA2_FAMILY = "mamba2"
MAMBA_FAMILY = "mamba"


def forward_parents(tree: TokenTree, chain_length: int) -> torch.Tensor:
    """Parent of each position of a `[chain, nodes]` forward, `-1` for the first chain position.

    Args:
        tree: the draft tree (`N` nodes); its root is the last chain position.
        chain_length: `C >= 1` uncached committed tokens fed before the nodes.

    Returns:
        `[C + N]` long tensor.
    """
    if chain_length < 1:
        raise ValueError("the forward must feed at least the root token (chain_length >= 1).")
    chain = torch.arange(chain_length) - 1
    nodes = torch.where(tree.parents < 0, chain_length - 1, tree.parents + chain_length)
    return torch.cat([chain, nodes])


def mixer_family(mixer: torch.nn.Module) -> str | None:
    """`"mamba2"` (scalar decay per head), `"mamba"` (diagonal decay per channel) or `None` (unknown)."""
    v1_names = ("in_proj", "out_proj", "x_proj", "dt_proj", "A_log", "D")
    if all(hasattr(mixer, name) for name in v1_names) and mixer.A_log.ndim == 2:
        return MAMBA_FAMILY
    names = ("in_proj", "out_proj", "dt_bias", "A_log", "D", "num_heads", "head_dim", "n_groups", "conv_dim")
    if all(hasattr(mixer, name) for name in names) and mixer.A_log.ndim == 1:
        return MAMBA2_FAMILY
    return None


def check_tree_scan(model: PreTrainedModel) -> None:
    """Raise `ValueError` unless every SSM mixer of `model` has a tree-aware forward here, and the tree-scan
    probe (`_compat.probes`, when it has run) found it exact and no test forced it off."""
    unknown = sorted({type(mixer).__name__ for mixer in ssm_mixers(model) if mixer_family(mixer) is None})
    if unknown:
        raise ValueError(
            f"tree verification has no tree scan for {', '.join(unknown)}; verify chains (drop tree_shape)."
        )
    reason = _tree_scan_refusal(model)
    if reason is not None:
        raise ValueError(
            f"tree verification has no exact tree scan for {type(model).__name__} here ({reason}); "
            "verify chains (drop tree_shape)."
        )


def _tree_scan_refusal(model: PreTrainedModel) -> str | None:
    if admission.forced_value("tree_scan") is False:
        return "forced off"
    for mixer in admission.representatives(model):
        found = admission.recorded("tree_scan", mixer)
        if found is not None and not found[0]:
            return f"{type(mixer).__name__}: {found[1]}"
    return None


@dataclass
class _TreePlan:
    """What every mixer needs about the forward's tree: parents, depth, ancestor mask, conv windows."""

    parents: torch.Tensor  # [T]
    ancestor_mask: torch.Tensor  # [T, T] bool
    depth: list[int]  # 1 for the first chain position
    _windows: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, parents: torch.Tensor) -> _TreePlan:
        parent_list = parents.tolist()
        size = len(parent_list)
        mask = torch.eye(size, dtype=torch.bool)
        depth: list[int] = []
        for position, parent in enumerate(parent_list):
            if parent >= 0:
                mask[position] |= mask[parent]
            depth.append(1 if parent < 0 else depth[parent] + 1)
        return cls(parents=parents, ancestor_mask=mask, depth=depth)

    def conv_windows(self, kernel_size: int, device: torch.device) -> torch.Tensor:
        """`[T, K]` indices into `[cached last K − 1 inputs, the T new inputs]`: position `t`'s window,
        oldest first (its ancestors at distance `K − 1 … 1`, then itself)."""
        key = (kernel_size, str(device))
        if key not in self._windows:
            parent_list = self.parents.tolist()
            rows = []
            for position in range(len(parent_list)):
                chain_up = [position]
                while len(chain_up) < kernel_size and parent_list[chain_up[-1]] >= 0:
                    chain_up.append(parent_list[chain_up[-1]])
                # past the first forward position, the cached window: its newest column is K − 2
                window = [(kernel_size - 1) + p for p in chain_up]
                window += [kernel_size - 2 - m for m in range(kernel_size - len(chain_up))]
                rows.append(window[::-1])
            self._windows[key] = torch.tensor(rows, dtype=torch.long, device=device)
        return self._windows[key]


@dataclass
class _LayerInputs:
    """One SSM layer's recorded replay inputs for every forward position (kept until the commit)."""

    mixer: torch.nn.Module
    conv_inputs: torch.Tensor  # [1, C_conv, T] pre-conv inputs
    x: torch.Tensor  # [1, T, H, P] (Mamba v1: [1, T, 1, D])
    dt: torch.Tensor  # [1, T, H, P] (expanded) step sizes Δ
    A: torch.Tensor  # [H, P, N] (expanded)
    B: torch.Tensor  # [1, T, G, N]


@dataclass
class TreeScanRecord:
    """What a tree verification forward recorded per SSM layer, for the commit of the accepted path.

    Attributes:
        layers: per SSM layer index, its pre-conv inputs `[1, C_conv, T]` and `x, Δ, A, B`.
    """

    layers: dict[int, _LayerInputs] = field(default_factory=dict)

    @property
    def recorded_bytes(self) -> int:
        """Bytes held by the recorded activations (expanded views count once)."""
        total = 0
        for inputs in self.layers.values():
            for tensor in (inputs.conv_inputs, inputs.x, inputs.B):
                total += tensor.numel() * tensor.element_size()
            total += inputs.dt[..., :1].numel() * inputs.dt.element_size()
        return total

    def commit(self, cache, positions: torch.Tensor) -> None:
        """Advance every SSM layer of `cache` over the forward `positions` `[L]` (the accepted path, root
        first), from the committed state the forward read: conv window, then the N-step SSM update."""
        if positions.numel() == 0:
            return
        for layer_idx, inputs in self.layers.items():
            layer = cache.layers[layer_idx]
            index = positions.to(inputs.x.device)
            kernel_size = inputs.mixer.conv_kernel_size
            layer.update_conv_state(
                inputs.conv_inputs.index_select(2, index), state_idx=0, conv_kernel_size=kernel_size
            )
            live = _committed_recurrent_state(cache, layer_idx)
            steps = (inputs.x[:, index], inputs.dt[:, index], inputs.A, inputs.B[:, index])
            if live is not None and live.dtype == torch.float32 and live.is_contiguous():
                # in place: the live state is the kernel's state
                selective_state_update_nstep(live.view(1, *inputs.A.shape), *steps)
                continue
            work = torch.zeros((1, *inputs.A.shape), dtype=torch.float32, device=inputs.x.device)
            if live is not None:
                work.copy_(live.reshape(work.shape))
            selective_state_update_nstep(work, *steps)
            dtype = live.dtype if live is not None else inputs.x.dtype
            layer.update_recurrent_state(work.reshape(_state_shape(inputs)).to(dtype), state_idx=0)


def _state_shape(inputs: _LayerInputs) -> tuple[int, ...]:
    if mixer_family(inputs.mixer) == MAMBA_FAMILY:
        return (1, inputs.A.shape[1], inputs.A.shape[2])
    return (1, *inputs.A.shape)


def _committed_conv_window(cache, layer_idx: int, kernel_size: int, like: torch.Tensor) -> torch.Tensor:
    """`[1, C_conv, K − 1]`: the last `K − 1` conv inputs before the forward (zeros before any token)."""
    return _compat.conv_window(cache.layers[layer_idx], kernel_size, like)


def _committed_recurrent_state(cache, layer_idx: int) -> torch.Tensor | None:
    return _compat.recurrent_state(cache.layers[layer_idx])


def _tree_conv(mixer, conv_inputs: torch.Tensor, plan: _TreePlan, cache) -> torch.Tensor:
    """Depthwise causal conv where each position sees its own ancestors. `[1, C, T]` → `[1, C, T]`."""
    kernel_size = mixer.conv_kernel_size
    cached = _committed_conv_window(cache, mixer.layer_idx, kernel_size, conv_inputs)
    extended = torch.cat([cached, conv_inputs], dim=-1)  # [1, C, K − 1 + T]
    weight = mixer.conv1d.weight.squeeze(1)  # [C, K]
    if use_cpu_kernels(extended, weight):
        # one compiled pass over channels (`hf_specssm.kernels.cpu`)
        windows = plan.conv_windows(kernel_size, torch.device("cpu"))
        out = depthwise_conv(extended, windows, weight, mixer.conv1d.bias, mixer.activation)
        return out.to(conv_inputs.dtype)
    windows = extended[:, :, plan.conv_windows(kernel_size, conv_inputs.device)]  # [1, C, T, K]
    out = torch.einsum("bctk,ck->bct", windows.to(weight.dtype), weight)
    if mixer.conv1d.bias is not None:
        out = out + mixer.conv1d.bias[:, None]
    return ACT2FN[mixer.activation](out).to(conv_inputs.dtype)


def _fused_tree_forward(
    mixer, route: state_replay.FusedRoute, projected: torch.Tensor, plan: _TreePlan, cache, record
) -> torch.Tensor:
    """`_mamba2_tree_forward` after `in_proj` in one compiled call (`state_replay.fused_mixer` with the tree's
    conv windows and ancestor mask), recording the same replay inputs."""
    batch, length, _ = projected.shape
    heads, head_dim, state_size = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size
    kernel_size, inner = mixer.conv_kernel_size, mixer.intermediate_size
    conv_inputs = projected[..., -(mixer.conv_dim + heads) : -heads].transpose(1, 2)  # [1, C, T]
    window = _committed_conv_window(cache, mixer.layer_idx, kernel_size, conv_inputs)  # [1, C, K − 1]
    state = _committed_recurrent_state(cache, mixer.layer_idx)
    if state is None:
        state = torch.zeros(batch, heads, head_dim, state_size, dtype=torch.float32, device=projected.device)
    out, convolved, dt = state_replay.fused_mixer(
        mixer,
        route,
        projected,
        window,
        state,
        windows=plan.conv_windows(kernel_size, torch.device("cpu")),
        mask=plan.ancestor_mask,
    )
    groups_state = mixer.n_groups * state_size
    record.layers[mixer.layer_idx] = _LayerInputs(
        mixer=mixer,
        conv_inputs=conv_inputs,
        x=convolved[..., :inner].reshape(batch, length, heads, head_dim),
        dt=dt[..., None].expand(-1, -1, -1, head_dim),
        A=state_replay.kernel_weights(mixer, route)[0][:, None, None].expand(heads, head_dim, state_size),
        B=convolved[..., inner : inner + groups_state].reshape(batch, length, mixer.n_groups, state_size),
    )
    return mixer.out_proj(out)


def _mamba2_tree_forward(
    mixer,
    hidden_states: torch.Tensor,
    plan: _TreePlan,
    cache,
    record,
    fused: state_replay.FusedRoute | None = None,
) -> torch.Tensor:
    """The Mamba2-family mixer computation, with tree conv and tree SSD. `[1, T, H_model]` → same. With
    the `fused` route of a mixer the `fused_verification` probe admitted, on CPU in float32 or bf16,
    everything between the projections runs as one compiled call (`_fused_tree_forward`)."""
    batch, length, _ = hidden_states.shape
    dtype = hidden_states.dtype
    # Falcon-H1's µP multipliers around the input projection
    if hasattr(mixer, "ssm_in_multiplier"):
        hidden_states = hidden_states * mixer.ssm_in_multiplier
    projected = mixer.in_proj(hidden_states)
    if hasattr(mixer, "mup_vector"):
        projected = projected * mixer.mup_vector
    if (
        fused is not None
        and dtype in state_replay.FUSED_DTYPES
        and dtype == mixer.in_proj.weight.dtype
        and use_cpu_kernels(projected)
    ):
        return _fused_tree_forward(mixer, fused, projected, plan, cache, record)
    gate, conv_inputs, dt = projected.split(
        [mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1
    )
    conv_inputs = conv_inputs.transpose(1, 2)
    convolved = _tree_conv(mixer, conv_inputs, plan, cache).transpose(1, 2)
    groups_state = mixer.n_groups * mixer.ssm_state_size
    x, B, C = convolved.split([mixer.intermediate_size, groups_state, groups_state], dim=-1)
    heads, head_dim, state_size = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size
    # Δ is not clamped to the mixer's `time_step_limit`: the tree's nodes must equal transformers' one-token
    # steps, which do not clamp (its multi-token chunk scan does; Zamba2's `time_step_min` makes them differ),
    # as in `state_replay.verification_scan`
    dt = F.softplus(dt + mixer.dt_bias.to(dt.dtype)).float()  # [1, T, H]
    A = -torch.exp(mixer.A_log.float())
    x = x.reshape(batch, length, heads, head_dim)
    B = B.reshape(batch, length, mixer.n_groups, state_size)
    C = C.reshape(batch, length, mixer.n_groups, state_size)
    state = _committed_recurrent_state(cache, mixer.layer_idx)
    if state is None:
        state = torch.zeros(batch, heads, head_dim, state_size, dtype=torch.float32, device=x.device)
    y = tree_scan(x, dt, A, B, C, state, plan.ancestor_mask.to(x.device), mixer.D)
    y = y.reshape(batch, length, heads * head_dim)
    # Falcon-H1 may have no gated norm (mamba_rms_norm=False): then the gate alone
    y = mixer.norm(y, gate) if getattr(mixer, "mamba_rms_norm", True) else y * F.silu(gate)
    record.layers[mixer.layer_idx] = _LayerInputs(
        mixer=mixer,
        conv_inputs=conv_inputs,
        x=x,
        dt=dt[..., None].expand(-1, -1, -1, head_dim),
        A=A[:, None, None].expand(heads, head_dim, state_size),
        B=B,
    )
    return mixer.out_proj(y.to(dtype))


def _mamba_tree_forward(
    mixer, hidden_states: torch.Tensor, plan: _TreePlan, cache, record, fused: object = None
) -> torch.Tensor:
    """The Mamba v1-family mixer computation (Mamba, FalconMamba, Jamba) with tree conv and tree scan
    (`fused` is ignored: no fused forward serves this family)."""
    dtype = hidden_states.dtype
    projected = mixer.in_proj(hidden_states).transpose(1, 2)
    conv_inputs, gate = projected.chunk(2, dim=1)  # [1, D, T] each
    x = _tree_conv(mixer, conv_inputs, plan, cache).transpose(1, 2)  # [1, T, D]
    time_step, B, C = torch.split(
        mixer.x_proj(x), [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
    )
    # FalconMamba and Jamba normalise Δ, B and C
    if hasattr(mixer, "dt_layernorm"):
        time_step = mixer.dt_layernorm(time_step)
        B = mixer.b_layernorm(B)
        C = mixer.c_layernorm(C)
    dt = (mixer.dt_proj.weight @ time_step.transpose(1, 2)).transpose(1, 2)  # [1, T, D]
    if mixer.dt_proj.bias is not None:
        dt = dt + mixer.dt_proj.bias.float()
    dt = F.softplus(dt).float()
    A = -torch.exp(mixer.A_log.float())  # [D, N]
    state = _committed_recurrent_state(cache, mixer.layer_idx)
    if state is None:
        state = torch.zeros(1, *A.shape, dtype=torch.float32, device=x.device)
    y = tree_scan_diagonal(x, dt, A, B, C, state, plan.parents, mixer.D)  # [1, T, D]
    y = y * F.silu(gate.transpose(1, 2).float())
    record.layers[mixer.layer_idx] = _LayerInputs(
        mixer=mixer, conv_inputs=conv_inputs, x=x[:, :, None], dt=dt[:, :, None], A=A[None], B=B[:, :, None]
    )
    return mixer.out_proj(y.to(dtype))


_TREE_FORWARDS = {MAMBA2_FAMILY: _mamba2_tree_forward, MAMBA_FAMILY: _mamba_tree_forward}


@contextlib.contextmanager
def tree_verification(
    model: PreTrainedModel,
    cache,
    parents: torch.Tensor,
    fused_routes: Mapping[torch.nn.Module, state_replay.FusedRoute] | None = None,
) -> Iterator[TreeScanRecord]:
    """Inside this context, a forward of `model` over `T` positions treats them as the tree `parents`.

    Every SSM mixer's `forward` is replaced (on the instance, restored on exit, `_compat.replaced_forwards`)
    by its family's tree-aware forward, which reads the committed conv and SSM state from `cache` and
    writes neither. The yielded
    record holds each layer's replay inputs; `record.commit(cache, positions)` advances the SSM layers over
    the accepted positions.

    Args:
        model: an SSM or hybrid causal LM (`check_tree_scan` passes).
        cache: the cache the forward is given (a `ForkableCache`).
        parents: `[T]` parent position of each forward position (`forward_parents`).
        fused_routes: the `fused_route` of each Mamba2-layout mixer the `fused_verification` probe
            admitted (`StateRecorder.fused_routes`): between their projections they run as one compiled
            call on CPU (`state_replay.fused_mixer`).
    """
    check_tree_scan(model)
    fused_routes = fused_routes or {}
    plan = _TreePlan.build(parents)
    record = TreeScanRecord()

    def make_forward(mixer, tree_forward):
        def forward(hidden_states, cache_params=None, attention_mask=None, **kwargs):
            if hidden_states.shape[0] != 1 or hidden_states.shape[1] != len(plan.depth):
                raise ValueError(
                    f"the tree forward expects [1, {len(plan.depth)}, H] inputs, got {tuple(hidden_states.shape)}."
                )
            if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
                raise ValueError("tree verification does not take padded rows.")
            return tree_forward(mixer, hidden_states, plan, cache, record, fused_routes.get(mixer))

        return forward

    forwards = {
        mixer: make_forward(mixer, _TREE_FORWARDS[mixer_family(mixer)]) for mixer in ssm_mixers(model)
    }
    with _compat.replaced_forwards(forwards):
        yield record


def score_tree_by_paths(model: PreTrainedModel, cache, chain: torch.Tensor, tree: TokenTree) -> torch.Tensor:
    """Baseline for comparison: one batch row per root-to-leaf path, each run as a chain from a copy of the
    committed state (shared prefixes are recomputed once per leaf). `cache` is left untouched.

    Args:
        model: an SSM causal LM (attention layers are not supported here).
        cache: its `ForkableCache` at the committed length.
        chain: `[1, C]` uncached committed tokens (the last is the root).
        tree: the draft tree.

    Returns:
        `[1, 1 + N, V]` float32 logits: after the root, then after each node.
    """
    if any(_compat.is_attention_layer(layer) for layer in cache.layers):
        raise ValueError("score_tree_by_paths is a baseline for pure SSM targets.")
    leaves = [node for node in range(tree.size) if not tree.children(node)] or [-1]
    paths = [tree.path(leaf) for leaf in leaves]
    width = max(len(path) for path in paths)
    rows = []
    for path in paths:
        tokens = tree.tokens[path].tolist()
        # right padding repeats the last token: causal rows never read it back
        rows.append(tokens + [tokens[-1] if tokens else int(chain[0, -1])] * (width - len(tokens)))
    batch_tokens = torch.cat([chain.expand(len(paths), -1), torch.tensor(rows, device=chain.device)], dim=1)
    forked = copy.deepcopy(cache)
    forked.fork(len(paths))
    with exact_continuation(model):
        logits = model(batch_tokens, **{_compat.cache_kwarg_name(model): forked, "use_cache": True}).logits
    offset = chain.shape[1] - 1
    out = logits.new_empty((1, 1 + tree.size, logits.shape[-1]))
    out[0, 0] = logits[0, offset]
    for row, path in enumerate(paths):
        for depth, node in enumerate(path):
            out[0, 1 + node] = logits[row, offset + 1 + depth]
    return out.float()
