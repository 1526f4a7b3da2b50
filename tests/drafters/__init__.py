"""Drafters: model, copy, n-gram, Mamba and ReDrafter drafters, their state and their checkpoints."""
