"""`python -m hf_specssm.kernels.cpu`: build (or find) the CPU kernels for this machine now, so that the
first verification does not pause for the compiler. Prints what happened; exits 0 either way (without the
kernels every caller runs the torch references)."""

from __future__ import annotations

import time

from hf_specssm.kernels import cpu


def main() -> int:
    if cpu.cpu_kernels_disabled():
        print(f"hf_specssm CPU kernels: switched off ({cpu.ENVIRONMENT_SWITCH}=0); the torch references run")
        return 0
    start = time.perf_counter()
    module = cpu.cpu_kernels()
    if module is None:
        print(
            f"hf_specssm CPU kernels: not available ({cpu.cpu_kernels_failure()}); the torch references run"
        )
    else:
        print(f"hf_specssm CPU kernels: ready in {time.perf_counter() - start:.1f} s ({module.__file__})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
