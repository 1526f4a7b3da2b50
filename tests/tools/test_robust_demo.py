"""The demo's queue is bounded: past `QUEUE_MAX_SIZE` waiting runs, a visitor is told it is full."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("gradio")

from hf_specssm_demo.app import QUEUE_MAX_SIZE, build_app
from hf_specssm_demo.catalog import Catalog


def test_the_queue_has_a_bound_and_refuses_past_it(tmp_path, monkeypatch):
    app = build_app(Catalog(cache_dir=tmp_path))
    queue = app._queue
    assert queue.max_size == QUEUE_MAX_SIZE
    # QUEUE_MAX_SIZE runs already waiting (counting them is Gradio's own `len`)
    monkeypatch.setattr(type(queue), "__len__", lambda self: QUEUE_MAX_SIZE)
    accepted, message, status = asyncio.run(queue.push(SimpleNamespace(fn_index=0), None, None))
    assert (accepted, status) == (False, "queue_full")
    assert f"Max size is {QUEUE_MAX_SIZE}" in message
