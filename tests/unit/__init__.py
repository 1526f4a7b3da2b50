"""Parts tested alone: the cache, schedules and tree policies, the token tree, layout and docstrings."""
