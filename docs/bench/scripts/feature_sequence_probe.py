"""Probe: does a draft head that attends over the target's feature sequence (EAGLE-style) agree with the
target more often than the shipped ReDrafter head, on the same stored data?

A research probe for issue 15, not a drafter: it trains, on a distill store's answers, one decoder layer
initialised from the target's last layer that reads `fc([h_j ; emb(a_j)])` at every answer position `j`
(`h_j` the target's stored last hidden state that chose answer token `a_j`), attends causally over the
answer so far, and predicts both the next hidden state `h_{j+1}` (smooth L1) and the next token `a_{j+1}`
(cross-entropy over a reduced vocabulary whose rows start from the target's). Simulated greedy chains of
`k` then feed the head's own predicted hidden states, exactly as a drafter would between verifications,
and are counted by the same `ChainTally` as `hf-specssm finetune-drafter evaluate`, on the store's held-out
greedy chats and on the benchmark answers (`artifacts/finetune/bench-answers`, written by `evaluate
--bench-sets`). By default the context is the answer only: the stores keep no hidden state for prompt
positions.

`--unroll D` trains the chains themselves (EAGLE-3's "training-time test"): besides the teacher-forced
pass, passes 2 … D feed the head's own predicted hidden states as a chain does, each with its own
cross-entropy (`FeatureSequenceHead.unrolled`; the hidden-state loss stays on the first pass).

`--context prompt` gives the head what a drafter would see at run time, the prompt's positions too: the
target's hidden states over each prompt (computed once by the sibling `prompt_features.py`, since stores
keep answers' only) become keys that every round attends to; losses stay on answer positions, so the two
contexts are compared on the same targets. `--train N` trains on the first N chats of a seeded order
(the chats `prompt_features.py --train N` covers), `--unseen M` also evaluates, per domain, the greedy
chats among the next M, `--load` evaluates a saved probe, `--init` continues training one (e.g. a
teacher-forced probe on chains, `--unroll 3`), and `--feature-scale channel` divides the
hidden-state loss by each channel's standard deviation (a few channels of the target's normed states
are 10× the rest).

    .venv/bin/python docs/bench/scripts/feature_sequence_probe.py --epochs 2 --bf16 --unroll 3 --out artifacts/probe-eagle-unroll3
    .venv/bin/python docs/bench/scripts/feature_sequence_probe.py --init artifacts/probe-scale-all/probe.pt --unroll 3 \
        --epochs 1 --bf16 --feature-scale channel --out artifacts/probe-all-unroll3
    .venv/bin/python docs/bench/scripts/prompt_features.py --train 600
    .venv/bin/python docs/bench/scripts/feature_sequence_probe.py --train 600 --epochs 3 --bf16 \
        --context prompt --feature-scale channel --out artifacts/probe-ctx-prompt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from hf_specssm.training.distillation.store import DistillStore
from hf_specssm.training.mamba_drafter.command import _resolve_model_path
from hf_specssm.training.mamba_drafter.finetune import GREEDY, ChainTally, heldout_greedy, load_examples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_features import prompt_key, seeded_order  # a sibling script


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Llama-family models apply it: `x [B, nh, T, d]`, `cos, sin [B, T, d]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class FeatureSequenceHead(torch.nn.Module):
    """`fc` → one decoder layer (the target's last, copied) → the target's final norm (copied) → draft logits.

    Shapes: `features [B, T, H]`, `tokens [B, T]` → `predicted [B, T, H]` (the next hidden state) and
    `logits [B, T, V + 1]` (slot 0 'other', never drafted).
    """

    def __init__(self, target: torch.nn.Module, vocabulary: torch.Tensor) -> None:
        super().__init__()
        import copy

        base = target.model
        hidden = target.config.hidden_size
        self.config = target.config
        self.embed = torch.nn.Embedding.from_pretrained(base.embed_tokens.weight.detach().float().clone())
        self.fc = torch.nn.Linear(2 * hidden, hidden)
        with torch.no_grad():
            self.fc.weight.normal_(std=0.02)
            self.fc.bias.zero_()
        self.layer = copy.deepcopy(base.layers[-1]).float()
        self.norm = copy.deepcopy(base.norm).float()
        self.rotary = base.rotary_emb
        rows = target.lm_head.weight.detach().float()[vocabulary]
        self.head = torch.nn.Linear(hidden, vocabulary.numel() + 1, bias=False)
        with torch.no_grad():
            self.head.weight[0].zero_()
            self.head.weight[1:] = rows
        self.heads = target.config.num_attention_heads
        self.kv_heads = target.config.num_key_value_heads
        self.head_dim = hidden // self.heads

    def qkv(self, x: torch.Tensor, positions: torch.Tensor, queries: torch.Tensor | None = None):
        """`x [B, T, H]` (after fc) → rotated `q [B, nh, T, d]`, `k, v [B, nh, T, d]` (kv heads repeated).

        `queries [B, Q]` (indices into `T`): queries only there, `q [B, nh, Q, d]` (the keys of a prompt's
        positions are all a drafter needs of them)."""
        attention = self.layer.self_attn
        b, t, _ = x.shape
        h = self.layer.input_layernorm(x)
        k = attention.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attention.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(h, positions)
        k = _rotate(k, cos, sin)
        if queries is not None:
            h, cos, sin = gather_rows(h, queries), gather_rows(cos, queries), gather_rows(sin, queries)
        q = attention.q_proj(h).view(b, h.shape[1], self.heads, self.head_dim).transpose(1, 2)
        q = _rotate(q, cos, sin)
        groups = self.heads // self.kv_heads
        return q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)

    def finish(self, x: torch.Tensor, attended: torch.Tensor):
        """Residual, MLP and norm: `x [B, T, H]`, `attended [B, nh, T, d]` → (`predicted`, `logits`)."""
        b, _, t, _ = attended.shape
        x = x + self.layer.self_attn.o_proj(attended.transpose(1, 2).reshape(b, t, -1))
        x = x + self.layer.mlp(self.layer.post_attention_layernorm(x))
        predicted = self.norm(x)
        return predicted, self.head(predicted)

    def inputs(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([features, self.embed(tokens)], dim=-1))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor):
        x = self.inputs(features, tokens)
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        q, k, v = self.qkv(x, positions)
        return self.finish(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def answer_forward(self, features: torch.Tensor, tokens: torch.Tensor, queries: torch.Tensor):
        """Causal attention over whole sequences, queries only at `queries [B, Q]` (the answer positions;
        padded rows may repeat an index): `features [B, T, H]`, `tokens [B, T]` → `predicted [B, Q, H]`,
        `logits [B, Q, V + 1]`. With `queries = arange(T)` this is `forward`."""
        x = self.inputs(features, tokens)
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        q, k, v = self.qkv(x, positions, queries)
        allowed = torch.arange(x.shape[1])[None, None, None, :] <= queries[:, None, :, None]  # [B, 1, Q, T]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.finish(gather_rows(x, queries), attended)

    def unrolled(self, features: torch.Tensor, tokens: torch.Tensor, depth: int):
        """Training-time chains: `depth` passes, pass `m` (0-based) computing at every position `j` what a
        round that started `m` tokens earlier drafts there — the true hidden states up to `j − m`, the
        head's own predictions after it (pass `m − 1`'s output at `j − 1`), the true tokens fed. Pass `m`'s
        query at `j` attends to the true keys `0 … j − m` and to passes `1 … m`'s keys on its diagonal
        (`pass m′` at `j − m + m′`), as `chain_drafts` computes one depth at a time.

        Returns: a list of `depth` pairs `(predicted [B, T, H], logits [B, T, V + 1])`; pass `m`'s entries
        at `j < m` have no round and are to be masked.
        """
        b, t, _ = features.shape
        positions = torch.arange(t)[None].expand(b, -1)
        x = self.inputs(features, tokens)
        q, k_true, v_true = self.qkv(x, positions)
        predicted, logits = self.finish(x, F.scaled_dot_product_attention(q, k_true, v_true, is_causal=True))
        outputs = [(predicted, logits)]
        scale = 1 / math.sqrt(self.head_dim)
        own_keys: list[torch.Tensor] = []  # pass m′'s keys and values, [B, nh, T, d] each
        own_values: list[torch.Tensor] = []
        for m in range(1, depth):
            fed = torch.cat([predicted[:, :1], predicted[:, :-1]], dim=1)  # pass m − 1's output at j − 1
            x = self.inputs(fed, tokens)
            q, k, v = self.qkv(x, positions)
            own_keys.append(k)
            own_values.append(v)
            scores = torch.einsum("bhid,bhjd->bhij", q, k_true) * scale
            allowed = torch.arange(t)[None, :] <= torch.arange(t)[:, None] - m  # true key j′ ≤ j − m
            scores = scores.masked_fill(~allowed, float("-inf"))
            diagonal = []
            for index, key in enumerate(own_keys):
                shift = m - 1 - index  # pass index + 1's key at j − shift
                shifted = torch.roll(key, shifts=shift, dims=2)
                diagonal.append((q * shifted).sum(-1) * scale)  # [B, nh, T]
            own = torch.stack(diagonal, -1)  # [B, nh, T, m]
            weights = torch.softmax(torch.cat([scores, own], -1), -1)
            weights = torch.nan_to_num(weights)  # rows j < m: no true key (masked out of the loss)
            attended = torch.einsum("bhij,bhjd->bhid", weights[..., :t], v_true)
            for index, value in enumerate(own_values):
                shift = m - 1 - index
                attended = attended + weights[..., t + index, None] * torch.roll(value, shifts=shift, dims=2)
            predicted, logits = self.finish(x, attended)
            outputs.append((predicted, logits))
        return outputs


def gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values [B, T, C]` at `index [B, Q]` → `[B, Q, C]`."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


def sequence(example, prompt: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """What the head reads of one chat: `features [T, H]` (float), `tokens [T]` and the offset of the
    answer's first position.

    Position `j` pairs token `x_j` with the hidden state that chose it (the target's at `j − 1`). Without
    `prompt` the sequence is the answer (`T = A`, offset 0); with `prompt [P, H]` (the target's hidden
    states over the prompt, `prompt_features.py`) it is the whole chat (`T = P + A`, offset `P`), the
    first position paired with zeros (no state chose it).
    """
    answer_features = example.hidden.float()
    if prompt is None:
        return answer_features, example.ids[example.prompt_length :], 0
    leading = torch.zeros(1, answer_features.shape[1])
    features = torch.cat([leading, prompt[: example.prompt_length - 1].float(), answer_features])
    return features, example.ids, example.prompt_length


def chain_table(
    model: FeatureSequenceHead, example, to_draft: torch.Tensor, k: int, prompt=None
) -> np.ndarray:
    """`[k, A − 1]` bool as `head_chain_table`: `[depth, i]` is whether the draft of answer token `i + 1` is
    the target's in a round that started `depth` tokens before (true hidden states up to the round's start,
    the head's own predicted ones after it, the true tokens fed); entries with `depth > i` stay false.
    `prompt`: as `sequence`'s (the prompt's positions become keys every round attends to)."""
    answer = example.ids[example.prompt_length :]
    drafts = chain_drafts(model, example, k, prompt)
    truth = to_draft[answer[1:]]
    return (drafts == truth[None]).numpy()


@torch.no_grad()
def chain_drafts(
    model: FeatureSequenceHead, example, k: int, prompt: torch.Tensor | None = None
) -> torch.Tensor:
    """`[k, A − 1]` draft ids (reduced vocabulary) of `chain_table`'s entries; −1 where `depth > i`."""
    features, tokens, offset = sequence(example, prompt)
    length = tokens.numel()
    count = length - offset - 1
    table = torch.full((k, count), -1, dtype=torch.long)
    x = model.inputs(features[None], tokens[None])  # [1, T, H]
    positions = torch.arange(length)[None]
    q, k_true, v_true = model.qkv(x, positions)
    scale = 1 / math.sqrt(model.head_dim)
    # depth 0: the teacher-forced pass
    predicted, logits = model.finish(x, F.scaled_dot_product_attention(q, k_true, v_true, is_causal=True))
    logits[..., 0] = torch.finfo(logits.dtype).min
    table[0] = logits[0, offset : offset + count].argmax(-1)
    # rows: round starts s = 0 … count − 1 (position offset + s); step m feeds (predicted h, a_{s+m})
    rounds = torch.arange(count)
    starts = offset + rounds
    previous = predicted[0, offset : offset + count]  # [n, H]: the head's h_{s+1}
    own_k, own_v = [], []
    mask_true = torch.arange(length)[None, :] <= starts[:, None]  # [n, T]: true keys up to the start
    for m in range(1, min(k, count)):
        valid = rounds + m < count  # a prediction of answer token s + m + 1 exists
        position = (starts + m).clamp(max=length - 1)
        xm = model.inputs(previous[:, None], tokens[position][:, None])  # [n, 1, H]
        qm, km, vm = model.qkv(xm, position[:, None])  # [n, nh, 1, d]
        own_k.append(km)
        own_v.append(vm)
        scores_true = torch.einsum("nhd,htd->nht", qm[:, :, 0], k_true[0]) * scale
        scores_true = scores_true.masked_fill(~mask_true[:, None, :], float("-inf"))
        keys, values = torch.cat(own_k, 2), torch.cat(own_v, 2)  # [n, nh, m, d]
        scores_own = torch.einsum("nhd,nhmd->nhm", qm[:, :, 0], keys) * scale
        weights = torch.softmax(torch.cat([scores_true, scores_own], -1), -1)
        attended = torch.einsum("nht,htd->nhd", weights[..., :length], v_true[0]) + torch.einsum(
            "nhm,nhmd->nhd", weights[..., length:], values
        )
        predicted_m, logits_m = model.finish(xm, attended[:, :, None])
        logits_m[..., 0] = torch.finfo(logits_m.dtype).min
        drafts = logits_m[:, 0].argmax(-1).masked_fill(~valid, -1)
        # entry [m, i] is the round that started m tokens before i, i.e. start s = i − m
        table[m, m:] = drafts[: count - m]
        previous = predicted_m[:, 0]
    return table


def evaluate(model, examples, to_draft, k, prompts=lambda example: None, group=None):
    """Simulated chains over `examples` (greedy ones with two answer tokens or more): τ, first-draft top-1,
    acceptance by position. With `group` (example → name), also one summary per name from the same tables
    (each chat's computed once): `{"all": {…}, name: {"chats", …}, …}`."""
    model.eval()
    tallies: dict[str, ChainTally] = {"all": ChainTally(k)}
    chats: Counter = Counter()
    for example in examples:
        if (
            example.mode == GREEDY
            and example.hidden is not None
            and example.ids.numel() - example.prompt_length >= 2
        ):
            table = chain_table(model, example, to_draft, k, prompts(example))
            tallies["all"].add(table)
            if group is not None:
                name = group(example)
                chats[name] += 1
                tallies.setdefault(name, ChainTally(k)).add(table)
    model.train()

    def summary(tally: ChainTally) -> dict:
        estimate = tally.estimate()
        return {"tau": round(estimate.tau, 3), "top1": round(estimate.top1, 3),
                "by_position": [round(a, 3) for a in estimate.acceptance_by_position], "rounds": estimate.rounds}  # fmt: skip

    if group is None:
        return summary(tallies["all"])
    return {"all": summary(tallies["all"])} | {
        name: {"chats": chats[name], **summary(tallies[name])} for name in sorted(chats)
    }


def batches(examples, batch_size, generator):
    order = torch.randperm(len(examples), generator=generator).tolist()
    for start in range(0, len(order), batch_size):
        yield [examples[i] for i in order[start : start + batch_size]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="artifacts/distill/qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--bench-store", default="artifacts/finetune/bench-answers")
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16, help="chats a step")
    parser.add_argument("--max-answer", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--unroll", type=int, default=1, help="train chains of this many drafts (own states)")
    parser.add_argument("--noise", type=float, default=0.0, help="std of gaussian noise on input features")
    parser.add_argument("--vocab", type=int, default=16383)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--context", choices=("answer", "prompt"), default="answer",
                        help="what the head attends over: the answer so far, or the prompt's positions too")  # fmt: skip
    parser.add_argument("--prompt-features", default="artifacts/probe-prompt-features",
                        help="prompt_features.py's folder (--context prompt)")  # fmt: skip
    parser.add_argument("--train", type=int, default=0,
                        help="train on this many chats, in prompt_features.py's seeded order (0: all)")  # fmt: skip
    parser.add_argument("--feature-scale", choices=("none", "channel"), default="none",
                        help="the hidden-state loss on raw values, or on values divided by each channel's std")  # fmt: skip
    parser.add_argument("--unseen", type=int, default=0,
                        help="also evaluate, per domain, the greedy chats among the next N of --train's order")  # fmt: skip
    parser.add_argument("--load", default=None, help="a probe.pt to evaluate instead of training one")
    parser.add_argument("--init", default=None, help="a probe.pt to continue training (e.g. with --unroll)")
    parser.add_argument("--out", default="artifacts/probe-eagle")
    args = parser.parse_args()
    if args.load and args.init:
        parser.error("--load evaluates a probe and --init continues training one: pass one of them")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    store = DistillStore(args.store)
    train = [e for e in load_examples(store, "train", need_hidden=True)]
    unseen = []
    if args.train:
        order = seeded_order(len(train))
        unseen = [train[i] for i in order[args.train : args.train + args.unseen] if train[i].mode == GREEDY]
        train = [train[i] for i in order[: args.train]]
    heldout = heldout_greedy(store, need_hidden=True, limit=200)
    bench_all = load_examples(DistillStore(args.bench_store), "all", need_hidden=True)
    bench_ids = [r["id"] for r in DistillStore(args.bench_store).records()]
    sets: dict[str, list] = {}
    for identifier, example in zip(bench_ids, bench_all, strict=True):
        sets.setdefault(identifier.split(":")[0], []).append(example)
    counts = Counter()
    for example in train:
        counts.update(example.ids[example.prompt_length :].tolist())
    vocabulary = torch.tensor([token for token, _ in counts.most_common(args.vocab)])
    tokens_total = sum(e.ids.numel() - e.prompt_length for e in train)
    covered = sum(counts[t] for t in vocabulary.tolist()) / sum(counts.values())
    print(
        f"{len(train)} chats, {tokens_total:,} answer tokens, {len(heldout)} held out; vocabulary covers {covered:.3f}"
    )

    folder = Path(args.prompt_features)

    loaded: dict[str, torch.Tensor] = {}

    def prompts(example) -> torch.Tensor | None:
        """`[P, H]` the prompt's hidden states (`--context prompt`; float16, kept once read), else None."""
        if args.context == "answer":
            return None
        key = prompt_key(example.ids, example.prompt_length)
        if key not in loaded:
            loaded[key] = torch.from_numpy(np.load(folder / f"{key}.npy"))
        return loaded[key]

    if args.context == "prompt":
        chats = train + heldout + bench_all + unseen
        missing = [e for e in chats if not (folder / f"{prompt_key(e.ids, e.prompt_length)}.npy").exists()]
        if missing:
            parser.error(f"{len(missing)} of {len(chats)} chats have no prompt features in {folder}: run "
                         f"prompt_features.py --train {len(train)} (it continues where it stopped)")  # fmt: skip
    scale = torch.ones(())
    if args.feature_scale == "channel":
        total = sum(e.hidden.shape[0] for e in train)
        mean = sum(e.hidden.double().sum(0) for e in train) / total
        square = sum((e.hidden.double() ** 2).sum(0) for e in train) / total
        scale = (square - mean**2).clamp_min(1e-6).sqrt().float()
        print(f"feature std per channel: median {scale.median():.3f}, max {scale.max():.3f}")

    target = AutoModelForCausalLM.from_pretrained(_resolve_model_path(args.target), dtype=torch.float32)
    to_draft = torch.zeros(target.config.vocab_size, dtype=torch.long)
    to_draft[vocabulary] = torch.arange(1, vocabulary.numel() + 1)
    model = FeatureSequenceHead(target, vocabulary)
    if args.load or args.init:
        saved = torch.load(args.load or args.init)
        if not torch.equal(saved["vocabulary"], vocabulary):
            raise SystemExit(
                f"{args.load or args.init} was trained with another vocabulary: pass its --train and --vocab"
            )
        model.load_state_dict(saved["state"])
    if args.load:
        args.epochs = 0
    del target
    trainable = [p for n, p in model.named_parameters() if not n.startswith("embed")]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
    steps = int(math.ceil(len(train) / args.batch_size) * args.epochs)
    warmup = min(50, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1))),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    log = open(out / "log.jsonl", "a")  # noqa: SIM115 (a probe's log, closed at its end)
    step, started = 0, time.time()
    results = (
        {"step": 0, "heldout": evaluate(model, heldout, to_draft, args.k, prompts)}
        if args.eval_every
        else None
    )
    if results:
        print(json.dumps(results), flush=True)
    while step < steps:
        for batch in batches(train, args.batch_size, generator):
            if step >= steps:
                break
            # each row: its sequence (`sequence`), the answer cut at --max-answer; queries at answer positions
            rows = []
            for example in batch:
                features_r, tokens_r, offset = sequence(example, prompts(example))
                answer_length = min(tokens_r.numel() - offset, args.max_answer)
                rows.append(
                    (features_r[: offset + answer_length], tokens_r[: offset + answer_length], offset)
                )
            width = max(t.numel() for _, t, _ in rows)
            answer_width = max(t.numel() - o for _, t, o in rows)
            features = torch.zeros(len(batch), width, model.config.hidden_size)
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            queries = torch.zeros(len(batch), answer_width, dtype=torch.long)
            valid = torch.zeros(len(batch), answer_width, dtype=torch.bool)
            for row, (features_r, tokens_r, offset) in enumerate(rows):
                features[row, : tokens_r.numel()] = features_r
                tokens[row, : tokens_r.numel()] = tokens_r
                answer_length = tokens_r.numel() - offset
                queries[row] = (offset + torch.arange(answer_width)).clamp(max=tokens_r.numel() - 1)
                valid[row, : answer_length - 1] = True  # a next answer token exists
            # what each query predicts: the next token and the next hidden state
            following = (queries + 1).clamp(max=width - 1)
            next_tokens = to_draft[tokens.gather(1, following)]
            next_features = features.gather(1, following[..., None].expand(-1, -1, features.shape[-1]))
            inputs = features + args.noise * torch.randn_like(features) if args.noise else features
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                if args.context == "answer":
                    passes = model.unrolled(inputs, tokens, args.unroll)  # queries = every position
                elif args.unroll == 1:
                    passes = [model.answer_forward(inputs, tokens, queries)]
                else:  # every position's passes, then the answer's
                    passes = [
                        (gather_rows(predicted, queries), gather_rows(logits, queries))
                        for predicted, logits in model.unrolled(inputs, tokens, args.unroll)
                    ]
            token_loss = feature_loss = 0.0
            for m, (predicted, logits) in enumerate(passes):
                mask = valid.clone()
                mask[:, :m] = False  # no round started m tokens before these
                token_loss = token_loss + F.cross_entropy(logits[mask].float(), next_tokens[mask])
                if m == 0:
                    feature_loss = F.smooth_l1_loss(
                        predicted[mask].float() / scale, next_features[mask] / scale
                    )
            token_loss = token_loss / len(passes)
            loss = token_loss + args.feature_weight * feature_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 10 == 0:
                row = {"step": step, "of": steps, "token_loss": round(token_loss.item(), 4),
                       "feature_loss": round(feature_loss.item(), 4), "seconds": round(time.time() - started)}  # fmt: skip
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
                log.flush()
            if args.eval_every and step % args.eval_every == 0:
                row = {"step": step, "heldout": evaluate(model, heldout, to_draft, args.k, prompts)}
                print(json.dumps(row), flush=True)
                log.write(json.dumps(row) + "\n")
    final = {
        "step": step,
        "seconds": round(time.time() - started),
        "heldout": evaluate(model, heldout, to_draft, args.k, prompts),
        "args": vars(args),
    }
    for name, examples in sets.items():
        final[name] = evaluate(model, examples, to_draft, args.k, prompts)
    if unseen:
        groups = evaluate(model, unseen, to_draft, args.k, prompts, group=lambda example: example.domain)
        final["unseen"] = groups.pop("all")
        final.update({f"unseen:{domain}": row for domain, row in groups.items()})
    print(json.dumps(final), flush=True)
    log.write(json.dumps(final) + "\n")
    log.close()
    if not args.load:
        torch.save({"state": model.state_dict(), "vocabulary": vocabulary}, out / "probe.pt")


if __name__ == "__main__":
    main()
