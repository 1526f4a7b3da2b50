"""Plain greedy decoding of SSM targets (random weights, published configs) and the fc drafter's draft
rounds, transformers' one-token steps vs `hf_specssm.lean_steps`, alternating in one process.

Run from the repository root: `.venv/bin/python docs/bench/scripts/lean_steps.py mamba2-370m …`
(targets from `hf_specssm.tools.bench.ssm_models.TARGET_CONFIGS`).
"""

import sys
import time

import torch
from transformers import AutoModelForCausalLM

import hf_specssm
from hf_specssm.drafters.base import DraftSampler
from hf_specssm.drafters.feature import FeatureDrafter
from hf_specssm.tools.bench.ssm_models import build_target

torch.set_num_threads(2)


def best(f, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - start)
    return min(times), out


new = 32
for name in sys.argv[1:] or ["mamba2-370m"]:
    for dtype in (torch.float32, torch.bfloat16):
        model = hf_specssm.enable(build_target(name, dtype))
        prompt = torch.randint(3, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
        model.generate(prompt, max_new_tokens=2, do_sample=False)

        def plain(model=model, prompt=prompt):
            return model.generate(prompt, max_new_tokens=new, do_sample=False)

        def lean(model=model, prompt=prompt):
            with hf_specssm.lean_steps(model):
                return model.generate(prompt, max_new_tokens=new, do_sample=False)

        a, ra = best(plain)
        b, rb = best(lean)
        a2, _ = best(plain)
        a = min(a, a2)
        print(
            f"{name} {str(dtype)[6:]}: transformers steps {new / a:.2f} tok/s, lean steps {new / b:.2f} tok/s "
            f"({a / b:.2f}x), same tokens {torch.equal(ra, rb)}",
            flush=True,
        )

m_dtype = torch.bfloat16
m = AutoModelForCausalLM.from_pretrained("checkpoints/mamba2-qwen2.5-coder-fc", dtype=m_dtype).eval()
sampler = DraftSampler(None, do_sample=False)


def rounds(lean, n=20):
    d = FeatureDrafter(m, num_draft_tokens=6, schedule="constant")
    if not lean:
        d._lean_mixers = []
    ids = torch.randint(0, 1000, (1, 100), generator=torch.Generator().manual_seed(0))
    d.begin(ids)
    d.observe_target_hidden(torch.randn(1, 1536, generator=torch.Generator().manual_seed(1)))
    seq = ids
    with torch.no_grad():
        for i in range(n + 3):
            if i == 3:
                t = time.perf_counter()
            dr = d.draft(seq, 6, sampler)
            seq = torch.cat([seq, dr.tokens[:, :2], torch.tensor([[7]])], 1)
            d.commit(seq, 2)
    return (time.perf_counter() - t) / n * 1e3


stock = min(rounds(False) for _ in range(3))
lean = min(rounds(True) for _ in range(3))
print(
    f"fc drafter bf16, rounds of 6 drafts (6 forwards): transformers steps {stock:.1f} ms, lean {lean:.1f} ms ({stock / lean:.2f}x)"
)
