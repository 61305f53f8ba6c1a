"""The Gradio app: `build_demo()` lays out the page and wires it to the race and the figures.

One model per process (a ModelService, loading in the background); everything about a visitor's
run lives in their own `gr.State`.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import gradio as gr

from . import figures, views
from ..decoding import MAX_LOOKUP_TOKENS, DecodeSettings
from .handlers import (DEFAULT_TOP_K_TEXT, MAX_NEW_TOKENS, Session, acquire_device, check_request, compare, make_settings,
                       prompt_ids)
from .highlight import plain_html, specstream_html
from .race import MEASUREMENT_NOTE, Trace, race
from .service import ModelChoice, ModelService

UPDATE_INTERVAL = 0.25  # seconds between live page updates; the decoders' clocks never count them
PLAY_INTERVAL = 0.8  # seconds per step when the replay plays
EXAMPLES = [
    "Write a Python function that checks whether a number is prime.",
    "List five tips for staying focused while studying.",
    "Summarize in two sentences: The Moon is Earth's only natural satellite. It formed about 4.5 billion years "
    "ago, probably from debris of a collision between Earth and a Mars-sized body, and its gravity drives the tides.",
    "Hi! Can you tell me a fun fact about octopuses?",
]
HOW_IT_WORKS = """**How it works.** Plain decoding runs one forward pass per token. Speculative Streaming teaches the
model itself to also predict the next few tokens: in its top layers every position carries a few *streams*, each
guessing one token further ahead, and their guesses form a tree of candidate continuations. One forward pass then
runs the whole tree at once, checks each drafted token against the model's own next-token choice (keeping the
longest matching path plus one *bonus* token) and, in the same pass, drafts the next tree from the streams.
(On a CPU, where every row costs, a pass computes streams only at the nodes where the accepted path is likely
to end; when it ends elsewhere, a short second pass through the top layers computes that node's: the step text
says so.) The mask below is the one that pass really used: each tree node sees its ancestors (blue), each stream
its node's view plus the earlier streams of the same node (green), and nothing ever looks at a stream."""
CSS = """
.ss-reply { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.75; min-height: 7em; max-height: 26em; overflow-y: auto;
            padding: 10px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px; font-size: 15px; }
.ss-token { color: #111827; border-radius: 3px; padding: 1px 0; cursor: pointer; }
.ss-bonus { border-bottom: 2px solid #111827; }
.ss-selected { outline: 2px solid #f59e0b; }
.ss-end { color: var(--body-text-color-subdued); padding: 0 2px; }
.ss-empty { color: var(--body-text-color-subdued); }
#ss-clicked-step { display: none; }
/* A tree needs room for its token labels: on a phone it scrolls sideways rather than overlap. */
#ss-tree { overflow-x: auto; }
#ss-tree .js-plotly-plot { min-width: 640px; }
"""
# A click on a token of the coloured reply selects its step in the replay, through a hidden textbox.
HEAD = """<script>
document.addEventListener('click', (event) => {
  const token = event.target.closest('.ss-token');
  const box = document.querySelector('#ss-clicked-step textarea');
  if (!token || !box) return;
  box.value = token.dataset.step + ':' + Date.now();
  box.dispatchEvent(new Event('input', { bubbles: true }));
});
</script>"""


def _inputs() -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row(equal_height=True):
        ui.prompt = gr.Textbox(label="Prompt", lines=3, scale=5, placeholder="Ask the model something…")
        with gr.Column(scale=1, min_width=120):
            ui.run = gr.Button("Run", variant="primary")
            ui.stop = gr.Button("Stop", variant="stop")
    gr.Examples(EXAMPLES, inputs=[ui.prompt], label="Examples: code, a list, a summary, chat")
    with gr.Accordion("Settings", open=False):
        with gr.Row():
            ui.max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS, value=64, step=1, label="Max new tokens")
            ui.gamma = gr.Slider(1, 8, value=3, step=1, label="Tree depth γ (the most streams used, up to the adapter's; the auto tree may use fewer)")
        ui.auto_tree = gr.Checkbox(True, label="Auto tree: each pass drafts the tree size that this machine's "
                                               "measured pass costs and the acceptance so far say is fastest")
        with gr.Row():
            ui.top_k = gr.Textbox(DEFAULT_TOP_K_TEXT, label="Top-k per depth (comma-separated)")
            ui.node_budget = gr.Slider(1, 256, value=DecodeSettings.node_budget, step=1,
                                       label="Node budget (tree size, root included; the most the auto tree may use)")
            ui.prune_threshold = gr.Slider(0.0, 0.99, value=0.0, step=0.01,
                                           label="Pruning threshold (0 = off; drops unlikely subtrees early)")
            ui.lookup_tokens = gr.Slider(0, MAX_LOOKUP_TOKENS, value=DecodeSettings.lookup_tokens, step=1,
                                         label="Copied branch: prompt lookup or phrase table (tokens; 0 = off)")
    return ui


def _race_columns(ui: SimpleNamespace) -> None:
    gr.Markdown(MEASUREMENT_NOTE, elem_classes="ss-note")
    ui.status = gr.Markdown("")
    with gr.Row():
        with gr.Column(min_width=300):
            ui.plain_stats = gr.Markdown("**Plain decoding**  \none token per forward pass")
            ui.plain_text = gr.HTML(plain_html([]))
        with gr.Column(min_width=300):
            ui.spec_stats = gr.Markdown("**Speculative Streaming**  \nseveral tokens per forward pass")
            ui.spec_text = gr.HTML(specstream_html([]))
            gr.Markdown("Each colour band is one forward pass; the underlined token is its bonus token. "
                        "Hover a token for details, click it to replay its step.", elem_classes="ss-note")
    ui.verdict = gr.Markdown("")


def _replay(ui: SimpleNamespace) -> None:
    with gr.Row():
        with gr.Column(scale=1, min_width=300):
            gr.Markdown("### Replay: the drafted tree of every step")
            with gr.Row():
                ui.previous = gr.Button("◀ Previous", size="sm", min_width=80)
                ui.play = gr.Button("▶ Play", size="sm", min_width=80)
                ui.next = gr.Button("Next ▶", size="sm", min_width=80)
            ui.step = gr.Slider(0, 1, value=0, step=1, label="Step (forward pass) of the last run")
            ui.clicked_step = gr.Textbox(elem_id="ss-clicked-step", show_label=False, container=False)
            ui.step_text = gr.Markdown(views.step_markdown(None, 0))
            gr.Markdown("Green: accepted (bold: the accepted path) · red: rejected by the main stream · "
                        "grey: pruned early · pale: never verified · diamonds: copied from earlier text (prompt lookup) · "
                        "squares: a frequent phrase of the model (phrase table). Hover a node for its stream, draft "
                        "probability (the stream's, mixed with how often the model's own replies, and in trees of 32 "
                        "nodes or more this conversation, went on that way), "
                        "rank, pruning score and the main stream's own choice.", elem_classes="ss-note")
        with gr.Column(scale=2, min_width=340):
            ui.tree = gr.Plot(figures.tree_figure(None), show_label=False, elem_id="ss-tree")
    ui.timer = gr.Timer(PLAY_INTERVAL, active=False)


def _charts(ui: SimpleNamespace) -> None:
    with gr.Accordion("Charts", open=True):
        with gr.Row():
            ui.race_plot = gr.Plot(figures.empty_figure("The race appears here after a run."), show_label=False)
            ui.accepted_plot = gr.Plot(figures.empty_figure("Accepted tokens per step."), show_label=False)
        with gr.Row():
            ui.depth_plot = gr.Plot(figures.empty_figure("Acceptance by depth."), show_label=False)
            ui.time_plot = gr.Plot(figures.empty_figure("Time per forward pass."), show_label=False)
    # Open from the start: Plotly sizes a figure drawn inside a closed accordion at a default width.
    with gr.Accordion("How it works", open=True):
        gr.Markdown(HOW_IT_WORKS)
        ui.mask = gr.Plot(figures.attention_mask_figure(None, 1), show_label=False)
    ui.download = gr.DownloadButton("Download the whole trace (JSON)", value=None, interactive=False)


def _layout(service: ModelService) -> SimpleNamespace:
    gr.Markdown("# 🌊 specstream: Speculative Streaming, drafted and verified live\n"
                "One model drafts and verifies its own future tokens in a single forward pass "
                "(Bhendawade et al., 2024). Race it against plain decoding, then replay every drafted tree.")
    ui = SimpleNamespace(model_info=gr.Markdown(views.model_markdown(service.info())), loader=gr.Timer(1.0))
    ui.__dict__.update(vars(_inputs()))
    _race_columns(ui)
    _replay(ui)
    _charts(ui)
    ui.session = gr.State(None)
    ui.playing = gr.State(False)
    return ui


def build_demo(service: ModelService | None = None, gpu_decorator=None) -> gr.Blocks:
    """The app. Without a service, the model named by the environment starts loading now.
    `gpu_decorator` (ZeroGPU's `spaces.GPU`) wraps the functions that decode."""
    service = service or ModelService(ModelChoice.from_environment()).start()
    on_gpu = gpu_decorator or (lambda fn: fn)
    # delete_cache: Gradio's copies of the trace downloads go after an hour, checked hourly.
    with gr.Blocks(title="specstream", css=CSS, head=HEAD, theme=gr.themes.Soft(), delete_cache=(3600, 3600)) as demo:
        ui = _layout(service)
        _wire_loading(ui, service)
        _wire_run(ui, service, on_gpu)
        _wire_replay(ui, service)
        _wire_api(service, on_gpu)
    return demo.queue(default_concurrency_limit=1)


def _wire_api(service: ModelService, on_gpu) -> None:
    @on_gpu
    def compare_api(prompt: str, max_new_tokens: int = 64) -> dict:
        """Race plain decoding against Speculative Streaming on one prompt. Returns JSON with plain_text,
        specstream_text, speedup, mean_accepted (tokens per forward pass), identical and steps (every step record)."""
        return compare(service, prompt, max_new_tokens)

    gr.api(compare_api, api_name="compare", concurrency_limit=1, concurrency_id="decode")


def _wire_loading(ui: SimpleNamespace, service: ModelService) -> None:
    def poll():
        info = service.info()
        done = info["status"] != "loading"
        gamma = gr.Slider(maximum=info["gamma"], value=info["gamma"]) if info["status"] == "ready" else gr.Slider()
        return views.model_markdown(info), gamma, gr.Timer(active=not done)

    ui.loader.tick(poll, outputs=[ui.model_info, ui.gamma, ui.loader], show_progress="hidden", queue=False)


def _live_outputs(ui, trace: Trace) -> dict:
    return {
        ui.plain_stats: views.side_markdown(trace.plain, "Plain decoding", trace.stopped),
        ui.plain_text: plain_html(trace.plain.records),
        ui.spec_stats: views.side_markdown(trace.specstream, "Speculative Streaming", trace.stopped),
        ui.spec_text: specstream_html(trace.specstream.records),
        ui.verdict: views.verdict_markdown(trace),
    }


def _final_outputs(ui, service: ModelService, session: Session) -> dict:
    trace = session.trace
    steps = trace.steps()
    best = max(steps, key=lambda r: (r.accepted_length, -r.step)).step if len(steps) > 1 else 0
    outputs = _live_outputs(ui, trace) | _step_outputs(ui, session, best)
    reason = "stopped" if trace.stopped else "finished"
    return outputs | {
        ui.status: f"Run {reason}. Showing step {best}, the one with the longest accepted draft; "
                   "step through the others below.",
        ui.step: gr.Slider(minimum=0, maximum=max(len(steps) - 1, 1), value=best),
        ui.race_plot: figures.race_figure(trace), ui.accepted_plot: figures.accepted_per_step_figure(trace),
        ui.depth_plot: figures.acceptance_by_depth_figure(trace), ui.time_plot: figures.pass_time_figure(trace),
        ui.download: gr.DownloadButton(value=views.write_trace_file(trace, service.info()), interactive=True),
        ui.session: session,
    }


def _wire_run(ui: SimpleNamespace, service: ModelService, on_gpu) -> None:
    settings_inputs = [ui.max_new_tokens, ui.gamma, ui.top_k, ui.node_budget, ui.prune_threshold, ui.lookup_tokens,
                       ui.auto_tree]
    outputs = {ui.status, ui.plain_stats, ui.plain_text, ui.spec_stats, ui.spec_text, ui.verdict, ui.step,
               ui.step_text, ui.tree, ui.mask, ui.race_plot, ui.accepted_plot, ui.depth_plot, ui.time_plot,
               ui.download, ui.session}

    @on_gpu
    def run(prompt, *settings_values):
        settings = make_settings(*settings_values)
        if not service.wait(0):
            yield {ui.status: "⏳ Waiting for the model to finish loading…"}
        ids = prompt_ids(service, prompt, settings)
        session = Session()
        yield {ui.status: "🏁 Racing…", ui.session: session}
        acquire_device(service)
        try:
            yield from _race_live(ui, service, session, prompt, ids, settings)
        finally:
            service.device_lock.release()
        yield _final_outputs(ui, service, session)

    def stop(session: Session | None):
        if session is not None:
            session.stop.set()

    # "minimal": the full progress overlay would dim the replies while they are being written.
    for trigger in (ui.run.click, ui.prompt.submit):
        checked = trigger(check_request, inputs=[ui.prompt, *settings_inputs], outputs=None, queue=False, api_name=False)
        checked.success(run, inputs=[ui.prompt, *settings_inputs], outputs=outputs, concurrency_limit=1,
                        concurrency_id="decode", api_name=False, show_progress="minimal")
    ui.stop.click(stop, inputs=[ui.session], queue=False, api_name=False)


def _race_live(ui, service: ModelService, session: Session, prompt, ids, settings):
    """Drive the race, checking Stop before every pass and updating the page at most every UPDATE_INTERVAL."""
    last_update = time.monotonic()
    try:
        for trace in race(service.model, prompt, ids, settings, service.base.token_text):
            session.trace = trace
            if session.stop.is_set():
                trace.stopped = True
                return
            if time.monotonic() - last_update >= UPDATE_INTERVAL:
                last_update = time.monotonic()
                yield _live_outputs(ui, trace)
    except ValueError as error:  # the decoders' own checks, said plainly
        raise gr.Error(f"The run could not start: {error}.")


def _step_outputs(ui, session: Session | None, step: int) -> dict:
    steps = session.trace.steps() if session and session.trace else []
    record = steps[step] if 0 <= step < len(steps) else None
    return {
        ui.step_text: views.step_markdown(record, len(steps)),
        ui.tree: figures.tree_figure(record),
        ui.mask: figures.attention_mask_figure(record, session.trace.depth if record else 1),
        ui.spec_text: specstream_html(steps, selected_step=step),
    }


def _wire_replay(ui: SimpleNamespace, service: ModelService) -> None:
    step_outputs = [ui.step_text, ui.tree, ui.mask, ui.spec_text]

    def show(step, session):
        return _step_outputs(ui, session, int(step))

    def move(step, session, delta):
        count = len(session.trace.steps()) if session and session.trace else 1
        return min(max(int(step) + delta, 0), count - 1)

    def clicked(value, session):
        return move(int(str(value).split(":")[0]), session, 0)

    def toggle_play(playing):
        return (not playing, gr.Timer(active=not playing), "⏸ Pause" if not playing else "▶ Play")

    def tick(step, session):
        count = len(session.trace.steps()) if session and session.trace else 1
        if int(step) + 1 >= count:
            return int(step), False, gr.Timer(active=False), "▶ Play"
        return int(step) + 1, True, gr.Timer(active=True), "⏸ Pause"

    ui.step.change(show, inputs=[ui.step, ui.session], outputs=step_outputs, show_progress="hidden", api_name=False)
    ui.previous.click(lambda s, x: move(s, x, -1), inputs=[ui.step, ui.session], outputs=ui.step, api_name=False)
    ui.next.click(lambda s, x: move(s, x, 1), inputs=[ui.step, ui.session], outputs=ui.step, api_name=False)
    ui.clicked_step.input(clicked, inputs=[ui.clicked_step, ui.session], outputs=ui.step, api_name=False)
    ui.play.click(toggle_play, inputs=ui.playing, outputs=[ui.playing, ui.timer, ui.play], api_name=False)
    ui.timer.tick(tick, inputs=[ui.step, ui.session], outputs=[ui.step, ui.playing, ui.timer, ui.play],
                  show_progress="hidden", api_name=False)
