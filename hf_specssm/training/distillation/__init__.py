"""Self-distillation data: the target's own answers to a broad built instruction set, in a sharded store.

`instructions` builds the prompts, `generate` answers them in batches (keeping top-k soft labels and last
hidden states), `store` keeps everything resumable across sessions, `pack` makes the compact committable
form, and `command` is `hf-specssm distill`.
"""
