"""The Gradio page: settings on the left, plain and speculative decoding streaming side by side."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import gradio as gr

from .catalog import TOY_FAMILY, Catalog, ModelChoice
from .race import (
    CHAIN,
    COPY_CHAIN,
    MAX_DRAFT_TOKENS,
    MAX_NEW_TOKENS,
    NGRAM_TABLE,
    PROMPT_LOOKUP,
    REDRAFTER,
    REDRAFTER_COPY,
    SCHEDULES,
    Frame,
    LaneView,
    Race,
    RaceSettings,
    available_methods,
    describe_error,
)
from .view import COLOR_MAP, LaneRenderer, chart_rows, lane_html, legend_html, meter, round_order, statistics

logger = logging.getLogger(__name__)

INTRO = """\
# hf_specssm: plain vs speculative decoding

Pick a target, a drafter and a method, then **Run**. The same prompt is decoded twice with the same
settings: first by the target alone (left), then speculatively (right). The two runs go **one after the
other**, each with the whole CPU, so that neither slows the other down; each pane's clock covers only its
own run. In the right pane, text on <span style="background-color:rgba(34,197,94,0.3)">green</span> was
accepted from the drafter and text on <span style="background-color:rgba(249,115,22,0.35)">orange</span>
came from the target (its correction or bonus token).
"""
TOY_NOTE = (
    "⚠️ **Random-weight demo models.** The toy Llama target and Mamba drafter are built offline with random "
    "weights and made to agree on most tokens; the output is token ids spelled as syllables, not language. "
    "Timings and acceptance are real; fetch a real model (`hf-specssm fetch NAME`) for real text."
)
METHODS_NOTE = f"""\
**Methods.** *{CHAIN}*, *{COPY_CHAIN}* (copies the continuation of a match of 2+ tokens in the text when
there is one, else drafts with the model; the best method for our Mamba drafter), *tree*, *bandit* (a UCB
bandit choosing the tree shape each round), *bandit + prompt-lookup branch* (the bandit's tree plus the
continuation of a match in the text) and *dynamic tree* (grown from the drafter's confidence, EAGLE-2
style) draft with the drafter model; with sampling on, trees are verified by multi-draft speculative
sampling. *{PROMPT_LOOKUP}* and *{NGRAM_TABLE}* draft from the
text itself and fit any target. *{REDRAFTER}* drafts from the target's own hidden state with a small
recurrent head: Qwen2.5-Coder-1.5B ships a trained one, other targets get an untrained head that shows the
mechanism rather than a speed-up; *{REDRAFTER_COPY}* adds the copy branch and is where the page starts for
a target with a trained head (our fastest method on all four public sets in the benchmarks).
"""
DEFAULT_PROMPT = "def fibonacci(n):"
NO_DRAFTER = "none"
# Runs wait in one queue (one race at a time); past this many waiting, a visitor is told the queue is
# full instead of waiting behind an unbounded line on a shared CPU.
QUEUE_MAX_SIZE = 8


def _model_note(catalog: Catalog, target_label: str) -> str:
    choice = catalog.find(target_label)
    if choice is None or choice.family == TOY_FAMILY:
        return TOY_NOTE
    dtype = catalog.dtype_choice()
    return f"Real model, {dtype.name} on this machine ({dtype.reason})."


def initial_method(target: ModelChoice, drafter: ModelChoice | None, trained_head: bool = False) -> str:
    """The method the page starts with: a target with a trained ReDrafter head (`trained_head`) races it with the copy branch
    (our fastest method on all four public sets in the benchmarks, docs/benchmarks.md); another real pair
    races its drafter with the copy branch; the toy pair's random text has nothing to copy, so it races a
    plain chain; a target without a drafter model uses prompt lookup."""
    if trained_head and REDRAFTER_COPY in available_methods():
        return REDRAFTER_COPY
    if drafter is None:
        return PROMPT_LOOKUP
    return CHAIN if target.family == TOY_FAMILY else COPY_CHAIN


def _on_target_change(catalog: Catalog, target_label: str) -> tuple[str, str]:
    """A new target: its note, and the first drafter model of its family (`none` if it has none)."""
    choice = catalog.find(target_label)
    drafter = catalog.default_drafter(choice) if choice is not None else None
    return _model_note(catalog, target_label), drafter.label if drafter is not None else NO_DRAFTER


def _outputs(frame: Frame, plain: LaneRenderer | None, spec: LaneRenderer | None) -> tuple:
    """Component values for one frame, in the order of `build_app`'s outputs."""
    status = f"❌ {frame.status}" if frame.error else frame.status
    return (
        status,
        lane_html(plain.runs(frame.plain) if plain is not None else []),
        meter(frame.plain, speculative=False),
        legend_html() + lane_html(spec.runs(frame.speculative) if spec is not None else []),
        meter(frame.speculative, speculative=True),
        statistics(frame),
        gr.update(value=chart_rows(frame.speculative), sort=round_order(frame.speculative)),
    )


def build_app(catalog: Catalog | None = None) -> gr.Blocks:
    """The demo page. Models are loaded on the first run that needs them, then kept.

    Args:
        catalog: the models on offer (default: the toy pair, plus what `hf-specssm fetch` has cached).
    """
    catalog = catalog or Catalog()
    race = Race(catalog)
    targets = [choice.label for choice in catalog.targets()]
    default_target = catalog.default_target()
    default_drafter = catalog.default_drafter(default_target)
    drafters = [choice.label for choice in catalog.drafters()] + [NO_DRAFTER]
    default_method = initial_method(
        default_target, default_drafter, trained_head=catalog.head_folder(default_target) is not None
    )

    def run_race(
        prompt,
        target,
        drafter,
        method,
        max_new_tokens,
        num_draft_tokens,
        schedule,
        do_sample,
        temperature,
        top_p,
        seed,
    ) -> Iterator[tuple]:
        settings = RaceSettings(
            prompt=prompt,
            target=target,
            drafter=None if drafter == NO_DRAFTER else drafter,
            method=method,
            max_new_tokens=max_new_tokens,
            num_draft_tokens=num_draft_tokens,
            schedule=schedule,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        plain = spec = None
        try:
            for frame in race.run(settings):
                if frame.decode is not None and plain is None:
                    plain, spec = LaneRenderer(frame.decode), LaneRenderer(frame.decode)
                yield _outputs(frame, plain, spec)
        except Exception as error:
            # The user gets one line; the log keeps the traceback.
            logger.exception("race failed")
            yield _outputs(Frame(status=describe_error(error), finished=True, error=True), None, None)

    with gr.Blocks(title="hf_specssm demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                target = gr.Dropdown(targets, value=default_target.label, label="Target", elem_id="target")
                note = gr.Markdown(_model_note(catalog, default_target.label), elem_id="model-note")
                drafter = gr.Dropdown(
                    drafters,
                    value=default_drafter.label if default_drafter else NO_DRAFTER,
                    label="Drafter model (for chain, tree and bandit)",
                    elem_id="drafter",
                )
                method = gr.Dropdown(
                    available_methods(), value=default_method, label="Method", elem_id="method"
                )
                prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", lines=4, elem_id="prompt")
                max_new_tokens = gr.Number(
                    64, label=f"Max new tokens (1–{MAX_NEW_TOKENS})", precision=0, elem_id="max-new-tokens"
                )
                with gr.Accordion("Drafting and sampling", open=False):
                    num_draft_tokens = gr.Slider(
                        1, MAX_DRAFT_TOKENS, value=5, step=1, label="Draft tokens per round (start value)"
                    )
                    schedule = gr.Dropdown(list(SCHEDULES), value="adaptive", label="Draft-length schedule")
                    do_sample = gr.Checkbox(False, label="Sample (otherwise greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p")
                    seed = gr.Number(0, label="Seed", precision=0)
                button = gr.Button("Run", variant="primary", elem_id="run")
                gr.Markdown(METHODS_NOTE)
            with gr.Column(scale=2):
                status = gr.Markdown("Ready.", elem_id="status")
                with gr.Row(equal_height=True):
                    with gr.Column():
                        gr.Markdown("### Plain decoding")
                        plain_meter = gr.Markdown("", elem_id="plain-meter")
                        plain_text = gr.HTML(lane_html([]), elem_id="plain-output")
                    with gr.Column():
                        gr.Markdown("### Speculative decoding")
                        spec_meter = gr.Markdown("", elem_id="spec-meter")
                        spec_text = gr.HTML(legend_html() + lane_html([]), elem_id="spec-output")
                stats = gr.Markdown("", elem_id="stats")
                chart = gr.BarPlot(
                    chart_rows(LaneView()),
                    x="round",
                    y="tokens",
                    color="source",
                    color_map=COLOR_MAP,
                    title="Tokens per round: accepted drafts and the target's own",
                    x_title="round",
                    y_title="tokens committed",
                    elem_id="rounds-chart",
                )

        def target_changed(label: str) -> tuple[str, str]:
            return _on_target_change(catalog, label)

        # a page helper, not an API: kept off the public endpoints
        target.change(target_changed, target, [note, drafter], api_visibility="private")
        button.click(
            run_race,
            [
                prompt,
                target,
                drafter,
                method,
                max_new_tokens,
                num_draft_tokens,
                schedule,
                do_sample,
                temperature,
                top_p,
                seed,
            ],
            [status, plain_text, plain_meter, spec_text, spec_meter, stats, chart],
            concurrency_limit=1,
            show_progress="hidden",
            api_name="race",
        )
    app.queue(max_size=QUEUE_MAX_SIZE, default_concurrency_limit=1)
    return app


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts, so the page fetches nothing from other servers."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True) -> str:
    """Serve `app` on `host:port` (a free port from 7860 on when `None`); returns the local URL.

    `block=False` returns once the server is up (tests, notebooks); `app.close()` stops it.
    """
    _, local_url, _ = app.launch(
        server_name=host,
        server_port=port,
        theme=theme(),
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=not block,
    )
    return local_url
