"""Drafters that record what the loop did, for tests that compare it against a recompute."""

from __future__ import annotations

import hf_specssm


class RecordingDrafter(hf_specssm.ModelDrafter):
    """Keeps the final cache and committed sequence instead of releasing them."""

    def end(self):
        self.final_cache = self.cache
        super().end()

    def commit(self, input_ids, num_accepted):
        super().commit(input_ids, num_accepted)
        self.final_sequence = input_ids

    def commit_tree(self, input_ids, path):
        super().commit_tree(input_ids, path)
        self.final_sequence = input_ids
