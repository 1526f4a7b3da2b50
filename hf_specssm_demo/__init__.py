"""The hf_specssm Gradio demo: plain and speculative decoding raced side by side.

Installed as `hf_specssm_demo` (console script `hf-specssm-demo`); `app.py` at the repository root runs
it as a Hugging Face Space. Layers, lowest first:

- `catalog`: which models exist on this machine (random-weight toy pair always, fetched real models when
  present); loads each lazily, once.
- `race`: validates a request, runs plain then speculative decoding in a worker thread and yields frames
  while both stream. No Gradio.
- `view`: turns frames into what the components show (highlighted tokens, statistics, chart rows).
- `app`: the Gradio page; `cli`: the launcher.
"""
