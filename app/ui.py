"""The Gradio page. Only wiring lives here; behaviour is in ``controller.py`` and ``views.py``.

The image is the workspace: a ``gr.HTML`` canvas (``canvas.py``, ``web/canvas.js``) that is the
drop zone, shows the image the moment it is attached, and draws the boxes in the browser as each
``<|/det|>`` arrives. Loading and queue state show in the conversation, never over the image or
the prompt.
"""

from __future__ import annotations

import contextlib
import html
import logging
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from model.generation import GenerationSettings

from . import params
from .api import register_api
from .backends.base import Backend
from .canvas import build_box_panel, build_canvas, canvas_value, page_css, page_js
from .controller import Controller
from .errors import SessionEnded, UserError
from .examples import EXAMPLES, EXAMPLES_DIR
from .hosting import AccessPolicy, middleware
from .label.tab import build_label_tab
from .limits import Limits
from .modes import MODE_HELP, Mode
from .render import font_warning
from .session import Session, Turn
from .uploads import UploadGuard
from .views import box_panel_html, chat_messages, inert, label_summary, raw_output
from .zerogpu import gpu, on_zerogpu

log = logging.getLogger("vl2-studio")
TITLE = "VL2 Grounding Studio"
WAIT_FOR_REPLY = "A reply is still being written: press Stop (Esc) first, or wait for it to finish."
KEYBOARD_HELP = (
    "Keys: Enter sends · Esc stops · 1–9 select a box · + − 0 zoom · "
    "click an object to ask “what is this?” · drag to pan, wheel or pinch to zoom"
)
# A streamed reply reaches the page at most this often: a backend that floods tokens (a GPU, vLLM)
# would otherwise send hundreds of updates a second, each re-rendered by the browser, and the
# page (its Stop button included) would fall behind by many seconds.
STREAM_INTERVAL_S = 0.1
BOX_INTERVAL_S = 0.05  # a new box is shown sooner than new words
# One click downloads: the export's file goes to the (hidden) file component, then this clicks it.
DOWNLOAD_JS = """
(file) => {
  if (!file || !file.url) return;
  const link = document.createElement('a');
  link.href = file.url;
  link.download = file.orig_name || '';
  document.body.append(link);
  link.click();
  link.remove();
}
"""
# Send and Stop share the prompt's corner: Stop only while a reply is being generated.
GENERATING = {"submit_btn": False, "stop_btn": True}
IDLE = {"submit_btn": True, "stop_btn": False}
ATTACHED_JS = "(value) => { if (window.vl2Canvas) window.vl2Canvas.attached(value); }"
SENT_JS = "() => { if (window.vl2Canvas) window.vl2Canvas.sent(); }"


def launch_options(limits: Limits | None = None, *, host: str = "127.0.0.1", share: bool = False) -> dict:
    """What ``demo.launch`` needs besides the address (Gradio 6 takes css/js there).

    ``show_error`` stays off: a ``gr.Error``'s message always reaches the user, while any other
    exception's text (internal details) stays in the server's log. The access guard
    (``app/hosting.py``) checks Host, Origin and body size on every request.
    """
    limits = limits or Limits()
    # One upload request may carry one message's images (and its multipart framing).
    upload_bytes = (limits.max_upload_mb * limits.max_images_per_turn + 1) * 2**20
    policy = AccessPolicy.for_launch(host, share=share, max_upload_bytes=upload_bytes)
    return {
        "css": page_css(),
        "js": page_js(),
        "max_file_size": f"{limits.max_upload_mb}mb",
        "show_error": False,
        "app_kwargs": {"middleware": middleware(policy)},
    }


def event_data(event: gr.EventData) -> dict:
    """What the canvas's script sent with an event (``trigger(name, data)``); a raw client may send anything."""
    return event._data if isinstance(event._data, dict) else {}


def header_markdown(backend: Backend, labels: list[str] | None = None) -> str:
    info = backend.info
    status = getattr(backend, "status", "ready")
    precision = html.escape(info.precision)
    reuse = getattr(backend, "reuse_summary", None)
    # On hover: what was loaded, part by part, and what the runtime reuses across questions.
    details = "\n".join(part for part in (info.details, reuse() if reuse is not None else "") if part)
    if details:
        precision = f'<abbr title="{html.escape(details, quote=True)}">{precision}</abbr>'
    line = (
        "See what DeepSeek-VL2 sees: ask about images, find objects, get answers with boxes. "
        f"**Model:** `{info.model_id}` · **precision:** {precision} · **device:** {info.device}"
    )
    if status != "ready":
        line += f"\n\n⏳ {html.escape(status)}"
    warning = font_warning(labels or [])
    if warning:
        line += f"\n\n⚠️ {html.escape(warning)}"
    return f"# {TITLE}\n{line}"


def build_demo(backend: Backend, *, image_dir: str | Path | None = None, limits: Limits | None = None) -> gr.Blocks:
    # Files are read only from this server's upload folder and the bundled examples (app/uploads.py).
    uploads = UploadGuard([get_upload_folder(), EXAMPLES_DIR])
    controller = Controller(backend, image_dir=image_dir, limits=limits, uploads=uploads)
    live_sessions: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()
    # The example thumbnails on the landing canvas are served from where they are.
    gr.set_static_paths([EXAMPLES_DIR])

    def end_session(session: Session | None) -> None:
        """Tab closed, state expired or cleared: stop its reply, delete its files.

        Gradio calls this on its event loop, where an exception would end all later clean-ups.
        """
        if session is None:
            return
        try:
            controller.forget(session)
        except Exception:
            log.exception("could not clean up session %s", session.session_id)

    def session_of(session: Session | None, request: gr.Request | None) -> Session:
        if session is None:
            session = Session()
        if request is not None and request.session_hash:
            live_sessions[request.session_hash] = session
        return session

    def canvas_of(session: Session) -> dict:
        return canvas_value(session, lambda entry: controller.view_url(session, entry), EXAMPLES)

    def chat_of(session: Session) -> list[dict]:
        return chat_messages(session, controller.view_paths(session))

    def render_all(session: Session, notice: str = "") -> tuple:
        labels = list(session.label_counts())
        return (
            chat_of(session),
            canvas_of(session),
            box_panel_html(session),
            raw_output(session),
            gr.update(value=notice, visible=bool(notice)),
            gr.update(visible=session.image_count_after_send() >= 3),
            gr.update(choices=labels, value=[label for label in labels if label not in session.hidden_labels]),
            label_summary(session),
            header_markdown(backend, labels),
        )

    def streamed(session: Session, *, boxes: bool, notice: str | None) -> tuple:
        """A mid-reply update: only what a token can change; the rest is skipped (not re-sent)."""
        return (
            chat_of(session),
            canvas_of(session) if boxes else gr.skip(),
            box_panel_html(session) if boxes else gr.skip(),
            raw_output(session),
            gr.skip() if notice is None else gr.update(value=notice, visible=bool(notice)),
            gr.skip(),
            gr.skip(),
            label_summary(session) if boxes else gr.skip(),
            gr.skip(),
        )

    def settings_from(temperature, top_p, repetition_penalty, max_new_tokens) -> GenerationSettings:
        """The sampling controls, checked (a raw client can send anything to these handlers too)."""
        return GenerationSettings(
            temperature=params.temperature(temperature),
            top_p=params.number("top_p", top_p, 0.01, 1.0),
            repetition_penalty=params.number("repetition_penalty", repetition_penalty, 1.0, 2.0),
            max_new_tokens=params.integer("max_new_tokens", max_new_tokens, 1, controller.limits.max_new_tokens),
        )

    def waiting_for_model(session: Session) -> Iterator[tuple]:
        """While the model loads, the reply says so (phase and seconds) instead of a bare spinner."""
        wait = getattr(backend, "wait", None)
        if wait is None or getattr(backend, "ready", True):
            return
        started = getattr(backend, "started_at", time.monotonic())
        while not wait(1.0):
            if session.closed or session.cancel_event.is_set():
                return
            phase = getattr(backend, "phase", "loading")
            shown = streamed(session, boxes=False, notice=None)
            chat = shown[0]  # the reply's place says what it waits for (the model's text stays empty)
            waiting = f"Waiting for the model ({phase}, {time.monotonic() - started:.0f} s)…"
            chat[-1] = {**chat[-1], "content": inert(waiting)}
            yield shown

    def respond_impl(
        message: dict | None,
        mode: str,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        max_new_tokens: int,
        session: Session | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        session = session_of(session, request)
        message = message if isinstance(message, dict) else {}
        files = list(message.get("files") or [])
        # On refusal the message and its images go back into the box, so nothing is lost.
        keep_message = gr.update(value={"text": message.get("text", ""), "files": files})
        try:
            settings = settings_from(temperature, top_p, repetition_penalty, max_new_tokens)
            text = params.text("message", message.get("text", ""), None)  # its length: Controller.begin
            turn, notes = controller.accept(session, text, files, params.mode(mode))
        except UserError as exc:
            gr.Warning(html.escape(str(exc)))
            yield (*render_all(session), keep_message, session)
            return
        for note in notes:
            gr.Info(html.escape(note))
        cleared = gr.update(value={"text": "", "files": []})
        try:
            # The image is on the canvas and the question in the chat before the model starts. The
            # state goes out with this first update (so Stop finds it) and the last; in between it
            # is the same object, and on ZeroGPU every copy sent would be pickled, images and all.
            yield (*render_all(session), cleared, session)
            for update in waiting_for_model(session):
                yield (*update, gr.skip(), gr.skip())
            if session.closed:
                return
            if session.cancel_event.is_set():  # stopped while the model was loading
                turn.reply, turn.stopped = "", True
                yield (*render_all(session), gr.skip(), session)
                return
            notice = ""
            updates = controller.run_turn(session, turn, settings, pace=(STREAM_INTERVAL_S, BOX_INTERVAL_S))
            # Closed however this handler ends (the browser gone included): the reply is cancelled.
            with contextlib.closing(updates):
                for update in updates:
                    if session.closed:  # cleared or left mid-reply: the state now holds another session
                        return
                    if update.notices:
                        notice = "\n\n".join(update.notices)
                    if update.done:
                        yield (*render_all(session, notice), gr.skip(), session)
                        continue
                    shown = streamed(session, boxes=update.boxes_changed, notice=notice if update.notices else None)
                    yield (*shown, gr.skip(), gr.skip())
        except SessionEnded:  # ended between the check above and a file it wrote
            return
        except UserError as exc:
            gr.Warning(html.escape(str(exc)))
            yield (*render_all(session), keep_message, session)

    def remember_session(session: Session | None, request: gr.Request) -> None:
        if session is not None:
            session_of(session, request)

    def stop(session: Session | None) -> None:
        if session is not None:
            controller.stop(session)

    def select_box(session: Session | None, event: gr.EventData):
        """A box clicked on the canvas, a row of the panel, a phrase of the answer, or keys 1–9."""
        session = session or Session()
        data = event_data(event)
        try:
            number = params.integer(
                "box", data.get("index"), 1, controller.limits.max_boxes * controller.limits.max_turns
            )
        except UserError:
            return (*render_all(session), session)
        session.select_number(number)
        return (*render_all(session), session)

    def pick_image(session: Session | None, event: gr.EventData):
        session = session or Session()
        data = event_data(event)
        if data.get("key") in session.images:
            session.active_image = data["key"]
        return canvas_of(session), session

    def pin_point(session: Session | None, event: gr.EventData):
        """Show a pin where the user clicked (instant, outside the model lane); the canvas sends
        original-image pixels, computed from its own transform, so no display scale is involved."""
        session = session or Session()
        data = event_data(event)
        key = data.get("key")
        if key not in session.images:
            return gr.skip(), session, None
        width, height = session.images[key].size
        try:
            point = (params.number("x", data.get("x"), 0, width), params.number("y", data.get("y"), 0, height))
        except UserError:
            return gr.skip(), session, None
        controller.place_pin(session, key, point)
        return canvas_of(session), session, [key, point[0], point[1]]

    @gpu
    def identify_click(session: Session | None, pending: list | None):
        session = session or Session()
        if not pending:
            return (*render_all(session), session)
        key, x, y = pending
        if key not in session.images:
            return (*render_all(session), session)
        try:
            result = controller.identify_click(session, key, (float(x), float(y)))
        except Exception as exc:  # the model failed: the pin goes, the message stays, the server lives
            pins = session.pins.get(key, [])
            if (float(x), float(y)) in pins:
                pins.remove((float(x), float(y)))
            if isinstance(exc, UserError):
                reason = str(exc)
            else:  # the details are for the log, not the page
                log.exception("click-to-ground failed")
                reason = "the model failed on this request (details are in the server's log)"
            gr.Warning(html.escape(f"Could not identify the object: {reason}"))
            return (*render_all(session), session)
        notice = result.notice or ("Answered from boxes already found on this image." if result.from_cache else "")
        return (*render_all(session, notice), session)

    def filter_labels(session: Session | None, visible: list[str]):
        session = session or Session()
        shown = {v for v in visible if isinstance(v, str)} if isinstance(visible, list) else set()
        session.hidden_labels = set(session.label_counts()) - shown
        return (*render_all(session), session)

    def rename(session: Session | None, label: str):
        session = session or Session()
        try:
            label = params.text("label", label or "", controller.limits.max_label_chars)
        except UserError as exc:
            gr.Warning(html.escape(str(exc)))
            return (*render_all(session), session, gr.skip())
        if session.rename_selected(label) is None:
            gr.Warning("Select a box (click it, its row, or press its number) and type a new label.")
        return (*render_all(session), session, "")

    def delete(session: Session | None):
        session = session or Session()
        if session.delete_selected() is None:
            gr.Warning("Select a box (click it, its row, or press its number) first.")
        return (*render_all(session), session)

    def export(kind: str):
        def run(session: Session | None):
            session = session or Session()
            writers = {"json": controller.export_json, "coco": controller.export_coco, "png": controller.export_png}
            try:
                return gr.update(value=writers[kind](session), visible=True)
            except UserError as exc:
                gr.Warning(html.escape(str(exc)))
                return gr.update()

        run.__name__ = f"export_{kind}"
        return run

    def keep_active(session: Session | None):
        session = session or Session()
        if session.replying:
            gr.Warning(WAIT_FOR_REPLY)
        elif session.active_image:
            session.keep_only(session.active_image)
            gr.Info("Kept only the active image; ask your next question about it.")
        return (*render_all(session), session)

    def undo(session: Session | None):
        """Takes back the last thing done: a box rename or delete, else the last turn."""
        session = session or Session()
        if session.replying:  # the turn being written is not taken away under the reply
            gr.Warning(WAIT_FOR_REPLY)
            return (*render_all(session), gr.skip(), session)
        undone = session.undo()
        if isinstance(undone, Turn) and undone.kind == "chat":  # its words go back into the prompt
            return (*render_all(session), gr.update(value={"text": undone.user_text, "files": []}), session)
        return (*render_all(session), gr.skip(), session)

    def clear(session: Session | None):
        """The one Clear: conversation, boxes, images, and whatever is attached to the prompt."""
        end_session(session)
        fresh = Session()
        return (*render_all(fresh), gr.update(value={"text": "", "files": []}), fresh)

    @gpu
    def retry(
        mode: str,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        max_new_tokens: int,
        session: Session | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        session = session_of(session, request)
        try:  # checked before the last turn is taken back, so a refusal leaves it where it was
            settings_from(temperature, top_p, repetition_penalty, max_new_tokens)
        except UserError as exc:
            gr.Warning(html.escape(str(exc)))
            yield (*render_all(session), gr.skip(), session)
            return
        if not session.turns or session.turns[-1].kind != "chat":
            gr.Warning("There is no question to ask again: Retry repeats the last message you sent.")
            yield (*render_all(session), gr.skip(), session)
            return
        last = session.undo_turn()
        text = {"text": last.user_text, "files": []}
        yield from respond_impl(
            text, last.mode.value, temperature, top_p, repetition_penalty, max_new_tokens, session, request
        )

    respond = gpu(respond_impl)

    def choose_example(event: gr.EventData):
        """An example thumbnail clicked: Stop appears, and the next step runs the example."""
        data = event_data(event)
        index = data.get("index")
        return gr.update(**GENERATING), index if isinstance(index, int) and 0 <= index < len(EXAMPLES) else None

    @gpu
    def run_example(
        index: int | None,
        temperature: float,
        top_p: float,
        repetition_penalty: float,
        max_new_tokens: int,
        session: Session | None,
        request: gr.Request,
    ) -> Iterator[tuple]:
        """An example from the landing canvas: its images and question, sent at once."""
        if not isinstance(index, int) or not 0 <= index < len(EXAMPLES):
            return
        example = EXAMPLES[index]
        message = {"text": example.text, "files": list(example.files)}
        mode_shown = example.mode.value
        for update in respond_impl(
            message, example.mode.value, temperature, top_p, repetition_penalty, max_new_tokens, session, request
        ):
            yield (*update, mode_shown)
            mode_shown = gr.skip()

    def on_unload(request: gr.Request) -> None:
        end_session(live_sessions.get(request.session_hash))

    def refresh_header(session: Session | None):
        status = getattr(backend, "status", "ready")
        labels = list(session.label_counts()) if session is not None else []
        return header_markdown(backend, labels), gr.Timer(active=status != "ready" and "failed" not in status)

    with gr.Blocks(title=TITLE, delete_cache=(600, 3600)) as demo:
        state = gr.State(None, time_to_live=controller.limits.session_ttl_seconds, delete_callback=end_session)
        pending_click = gr.State(None)
        example_choice = gr.State(None)
        header = gr.Markdown(header_markdown(backend), elem_id="header")
        timer = gr.Timer(1.0, active=getattr(backend, "status", "ready") != "ready")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Ask & find", id="ask", elem_id="ask-tab"), gr.Row(equal_height=False, elem_id="main-row"):
                with gr.Column(scale=7, min_width=320, elem_id="work-col"):
                    canvas = build_canvas(canvas_of(Session()))
                    with gr.Accordion("Boxes", open=True, elem_id="boxes-section"):
                        counts = gr.Markdown(label_summary(Session()), elem_id="box-counts")
                        panel = build_box_panel(box_panel_html(Session()))
                        label_filter = gr.CheckboxGroup(label="Show boxes for", choices=[], elem_id="label-filter")
                        with gr.Row():
                            new_label = gr.Textbox(
                                placeholder="New label for the selected box", show_label=False, scale=3
                            )
                            rename_button = gr.Button("Rename", size="sm", scale=1)
                            delete_button = gr.Button("Delete", size="sm", scale=1)
                        with gr.Row():
                            json_button = gr.Button("⬇ JSON", size="sm")
                            coco_button = gr.Button("⬇ COCO", size="sm")
                            png_button = gr.Button("⬇ Annotated PNG", size="sm")
                        download = gr.File(label="Last export", interactive=False, elem_id="download", visible=False)
                    with gr.Accordion(
                        "Raw output (the model's exact text and rejected spans)", open=False, elem_id="raw-section"
                    ):
                        raw = gr.Code(label="Model text", language=None, lines=6, interactive=False)
                with gr.Column(scale=5, min_width=320, elem_id="chat-col"):
                    chatbot = gr.Chatbot(
                        label="Conversation",
                        height=440,
                        layout="panel",
                        elem_id="chat",
                        buttons=["copy", "copy_all"],
                        feedback_options=None,
                        sanitize_html=True,
                        placeholder="Answers appear here. Phrases with a box are coloured like it: hover or click one.",
                    )
                    notice = gr.Markdown(visible=False, elem_id="notice")
                    keep_button = gr.Button(
                        "Keep only the active image", visible=False, size="sm", elem_id="keep-button"
                    )
                    mode = gr.Radio(
                        [m.value for m in Mode],
                        value=Mode.ASK.value,
                        label="Mode",
                        info=" · ".join(f"{m.value}: {h}" for m, h in MODE_HELP.items()),
                        elem_id="mode",
                    )
                    textbox = gr.MultimodalTextbox(
                        placeholder="Ask about the image (or drop, paste, attach one). Enter sends, Esc stops.",
                        file_count="multiple",
                        file_types=["image"],
                        sources=["upload"],
                        show_label=False,
                        **IDLE,
                        elem_id="prompt",
                    )
                    with gr.Row(elem_id="actions"):
                        retry_button = gr.Button("Retry", size="sm")
                        undo_button = gr.Button("Undo", size="sm")
                        clear_button = gr.Button("Clear all", size="sm")
                    gr.Markdown(KEYBOARD_HELP, elem_id="keyboard-help")
                    with gr.Accordion("Sampling", open=False, elem_id="sampling-section"):
                        temperature = gr.Slider(0, 1.0, value=0.1, step=0.05, label="Temperature (0 = greedy)")
                        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                        repetition_penalty = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
                        max_new_tokens = gr.Slider(
                            16, 2048, value=512, step=16, label="Max new tokens", elem_id="max-new-tokens"
                        )
            with gr.Tab("Label a dataset", id="label", elem_id="label-tab"):
                build_label_tab(controller, state, session_of)

        views = [chatbot, canvas, panel, raw, notice, keep_button, label_filter, counts, header]
        sampling = [temperature, top_p, repetition_penalty, max_new_tokens]
        private = {"api_visibility": "private"}
        model_lane = {"concurrency_id": "model", "concurrency_limit": 1}
        # Progress and queue position show in the conversation, never over the image or the prompt.
        in_chat = {"show_progress": "minimal", "show_progress_on": [chatbot]}
        quiet = {"show_progress": "hidden"}
        # Stop appears the moment a reply is asked for (before the queue reaches it); Send comes
        # back when the reply has ended, however it ended.
        generating = {"fn": lambda: gr.update(**GENERATING), "inputs": None, "outputs": textbox, "queue": False}
        sent = textbox.submit(**generating, **private, **quiet).then(
            respond, [textbox, mode, *sampling, state], [*views, textbox, state], **model_lane, **private, **in_chat
        )
        textbox.submit(None, None, None, js=SENT_JS, **private)
        textbox.change(None, [textbox], None, js=ATTACHED_JS, **private)
        retried = retry_button.click(**generating, **private, **quiet).then(
            retry, [mode, *sampling, state], [*views, textbox, state], **model_lane, **private, **in_chat
        )
        example_run = canvas.example(
            choose_example, None, [textbox, example_choice], queue=False, **private, **quiet
        ).then(
            run_example,
            [example_choice, *sampling, state],
            [*views, textbox, state, mode],
            **model_lane,
            **private,
            **in_chat,
        )
        # On ZeroGPU the handlers above run in a forked process; the session they return is
        # registered here, in the server's, so that closing the tab finds it.
        for event in (sent, retried, example_run):
            event.then(remember_session, [state], None, queue=False, **private)
            event.then(lambda: gr.update(**IDLE), None, textbox, queue=False, **private, **quiet)
        # On ZeroGPU the reply runs in another process that the session's cancel event cannot reach;
        # cancelling the event there closes the handler, and `spaces` stops the child's generator.
        stop_cancels = [sent, retried, example_run] if on_zerogpu() else None
        textbox.stop(stop, [state], None, queue=False, cancels=stop_cancels, **private)
        undo_button.click(undo, [state], [*views, textbox, state], **private, **quiet)
        clear_button.click(clear, [state], [*views, textbox, state], **private, **quiet)
        keep_button.click(keep_active, [state], [*views, state], **private, **quiet)
        canvas.select_box(select_box, [state], [*views, state], queue=False, **private, **quiet)
        panel.select_box(select_box, [state], [*views, state], queue=False, **private, **quiet)
        canvas.pick_image(pick_image, [state], [canvas, state], queue=False, **private, **quiet)
        canvas.point(
            pin_point,
            [state],
            [canvas, state, pending_click],
            queue=False,
            trigger_mode="always_last",
            **private,
            **quiet,
        ).then(
            identify_click,
            [state, pending_click],
            [*views, state],
            trigger_mode="always_last",
            **model_lane,
            **private,
            **in_chat,
        )
        label_filter.input(filter_labels, [state, label_filter], [*views, state], **private, **quiet)
        rename_button.click(rename, [state, new_label], [*views, state, new_label], **private, **quiet)
        new_label.submit(rename, [state, new_label], [*views, state, new_label], **private, **quiet)
        delete_button.click(delete, [state], [*views, state], **private, **quiet)
        for button, kind in ((json_button, "json"), (coco_button, "coco"), (png_button, "png")):
            button.click(export(kind), [state], download, **private, **quiet).success(
                None, [download], None, js=DOWNLOAD_JS, **private
            )
        timer.tick(refresh_header, [state], [header, timer], **private, **quiet)
        register_api(controller)
        demo.unload(on_unload)
    return demo
