"""The Gradio page. Only wiring lives here; behaviour is in ``controller.py`` and ``views.py``."""

from __future__ import annotations

import html
import logging
import weakref
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from model.generation import GenerationSettings

from . import params
from .api import register_api
from .backends.base import Backend
from .controller import Controller
from .errors import SessionEnded, UserError
from .examples import EXAMPLES, EXAMPLES_DIR
from .hosting import AccessPolicy, middleware
from .limits import Limits
from .modes import MODE_HELP, Mode
from .session import Session
from .uploads import UploadGuard
from .views import annotated_view_file, box_rows, chat_messages, label_summary, prune_views, raw_output, view_signature
from .zerogpu import gpu, on_zerogpu

log = logging.getLogger("vl2-studio")
TITLE = "VL2 Grounding Studio"
BOX_HEADERS = ["#", "label", "image", "turn", "pixels x1, y1, x2, y2", "0–999"]
WAIT_FOR_REPLY = "A reply is still being written: press Stop (Esc) first, or wait for it to finish."
KEYBOARD_HELP = "Keys: Enter sends · Esc stops · 1–9 select a box · click the image to ask “what is this?”"
CSS = """
#header h1 {margin-bottom: 0}
#notice {border-left: 4px solid #f5a623; padding-left: 8px}
#chat img {max-height: 200px; width: auto}
#gallery .thumbnail-item {height: 84px}
"""
# Esc stops the reply; digits select boxes (unless the user is typing in a field).
KEYBOARD_JS = """
() => {
  document.addEventListener('keydown', (event) => {
    const typing = ['INPUT', 'TEXTAREA'].includes(document.activeElement?.tagName);
    if (event.key === 'Escape') {
      document.querySelector('#prompt button.stop-button')?.click();
      return;
    }
    if (typing || event.ctrlKey || event.metaKey || event.altKey || !/^[1-9]$/.test(event.key)) return;
    // Selecting box N is clicking row N of the box table, which the server handles like a mouse click.
    const cell = document.querySelector(`#box-table [data-testid="cell-${Number(event.key) - 1}-0"]`);
    if (!cell) return;
    for (const type of ['mousedown', 'mouseup', 'click']) {
      cell.dispatchEvent(new MouseEvent(type, {bubbles: true, cancelable: true, view: window}));
    }
  });
}
"""


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
        "css": CSS,
        "js": KEYBOARD_JS,
        "max_file_size": f"{limits.max_upload_mb}mb",
        "show_error": False,
        "app_kwargs": {"middleware": middleware(policy)},
    }


def header_markdown(backend: Backend) -> str:
    info = backend.info
    status = getattr(backend, "status", "ready")
    precision = html.escape(info.precision)
    if info.details:  # what was loaded, part by part, on hover
        precision = f'<abbr title="{html.escape(info.details, quote=True)}">{precision}</abbr>'
    line = f"**Model:** `{info.model_id}` · **precision:** {precision} · **device:** {info.device}"
    if status != "ready":
        line += f"\n\n⏳ {status}"
    return f"# {TITLE}\nSee what DeepSeek-VL2 sees: ask about images, find objects, get answers with boxes.\n\n{line}"


def build_demo(backend: Backend, *, image_dir: str | Path | None = None, limits: Limits | None = None) -> gr.Blocks:
    # Files are read only from this server's upload folder and the bundled examples (app/uploads.py).
    uploads = UploadGuard([get_upload_folder(), EXAMPLES_DIR])
    controller = Controller(backend, image_dir=image_dir, limits=limits, uploads=uploads)
    live_sessions: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()

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

    def gallery_items(session: Session) -> list[tuple[str, str]]:
        return [(controller.image_path(session, k), f"{k}: {e.name}") for k, e in session.images.items()]

    def view_update(session: Session, *, force: bool = False):
        """The annotated image, or ``gr.skip()`` mid-stream when the browser already shows exactly that.

        Final updates always carry the view: Gradio may coalesce intermediate streamed updates, so a
        view sent only mid-stream could be lost.
        """
        key = session.active_image
        signature = view_signature(session, key) if key else None
        if signature == session.shown_view and not force:
            return gr.skip()
        previous, session.shown_view = session.shown_view, signature
        folder = controller.session_dir(session)
        path = annotated_view_file(session, key, folder)
        # Gradio copies each view it sends; ours are kept only while the browser may still fetch them.
        prune_views(folder, keep=(signature, previous))
        return path

    def panel(session: Session) -> tuple:
        labels = list(session.label_counts())
        visible = [label for label in labels if label not in session.hidden_labels]
        return (
            gr.update(value=box_rows(session)),
            gr.update(choices=labels, value=visible),
            label_summary(session),
        )

    def render_all(session: Session, notice: str = "") -> tuple:
        return (
            chat_messages(session, controller.image_paths(session)),
            view_update(session, force=True),
            gallery_items(session),
            raw_output(session),
            gr.update(value=notice, visible=bool(notice)),
            gr.update(visible=session.image_count_after_send() >= 3),
            *panel(session),
        )

    def settings_from(temperature, top_p, repetition_penalty, max_new_tokens) -> GenerationSettings:
        """The sampling controls, checked (a raw client can send anything to these handlers too)."""
        return GenerationSettings(
            temperature=params.temperature(temperature),
            top_p=params.number("top_p", top_p, 0.01, 1.0),
            repetition_penalty=params.number("repetition_penalty", repetition_penalty, 1.0, 2.0),
            max_new_tokens=params.integer("max_new_tokens", max_new_tokens, 1, controller.limits.max_new_tokens),
        )

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
            notice = ""
            # The state goes out with the first update (so Stop finds it) and the last; in between
            # it is the same object, and on ZeroGPU every copy sent would be pickled, images and all.
            state_out = session
            for update in controller.run_turn(session, turn, settings):
                if session.closed:  # cleared or left mid-reply: the state now holds another session
                    return
                if update.notices:
                    notice = "\n\n".join(update.notices)
                if update.done:
                    yield (*render_all(session, notice), cleared, session)
                    continue
                yield (
                    chat_messages(session, controller.image_paths(session)),
                    view_update(session) if update.boxes_changed else gr.skip(),
                    gallery_items(session) if update.notices else gr.skip(),
                    raw_output(session),
                    gr.update(value=notice, visible=bool(notice)),
                    gr.update(visible=session.image_count_after_send() >= 3),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                    cleared,
                    state_out,
                )
                state_out = gr.skip()
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

    def select_image(session: Session | None, event: gr.SelectData):
        session = session or Session()
        keys = list(session.images)
        if isinstance(event.index, int) and 0 <= event.index < len(keys):
            session.active_image = keys[event.index]
        return view_update(session), session

    def pin_click(session: Session | None, event: gr.SelectData):
        """Show a pin where the user clicked (instant, outside the model lane)."""
        session = session or Session()
        key = session.active_image
        if key is None or not isinstance(event.index, list | tuple) or len(event.index) != 2:
            return gr.skip(), session, None
        try:
            shown = [params.number("click", v, 0, params.PIXEL_LIMIT) for v in event.index]
        except UserError:
            return gr.skip(), session, None
        point = controller.display_to_original(session, key, *shown)
        controller.place_pin(session, key, point)
        return view_update(session), session, [key, point[0], point[1]]

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

    def select_row(session: Session | None, event: gr.SelectData):
        session = session or Session()
        row = event.index[0] if isinstance(event.index, list | tuple) else event.index
        if isinstance(row, int):
            session.select_number(row + 1)
        return (*render_all(session), session)

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
            gr.Warning("Select a box in the table (or press its number) and type a new label.")
        return (*render_all(session), session, "")

    def delete(session: Session | None):
        session = session or Session()
        if session.delete_selected() is None:
            gr.Warning("Select a box in the table (or press its number) first.")
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
        session = session or Session()
        if session.replying:  # the turn being written is not taken away under the reply
            gr.Warning(WAIT_FOR_REPLY)
            return (*render_all(session), gr.skip(), session)
        turn = session.undo()
        text = turn.user_text if turn and turn.kind == "chat" else ""
        return (*render_all(session), gr.update(value={"text": text, "files": []}), session)

    def clear(session: Session | None):
        end_session(session)
        fresh = Session()
        return (*render_all(fresh), fresh)

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
        last = session.undo()
        text = {"text": last.user_text, "files": []}
        yield from respond_impl(
            text, last.mode.value, temperature, top_p, repetition_penalty, max_new_tokens, session, request
        )

    respond = gpu(respond_impl)

    def on_unload(request: gr.Request) -> None:
        end_session(live_sessions.get(request.session_hash))

    def refresh_header():
        status = getattr(backend, "status", "ready")
        return header_markdown(backend), gr.Timer(active=status != "ready" and "failed" not in status)

    with gr.Blocks(title=TITLE, delete_cache=(600, 3600)) as demo:
        state = gr.State(None, time_to_live=controller.limits.session_ttl_seconds, delete_callback=end_session)
        pending_click = gr.State(None)
        header = gr.Markdown(header_markdown(backend), elem_id="header")
        timer = gr.Timer(1.0, active=getattr(backend, "status", "ready") != "ready")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image_view = gr.Image(
                    label="Image and boxes — click an object to ask what it is",
                    type="filepath",
                    interactive=False,
                    height=560,
                    elem_id="image-view",
                    buttons=["download", "fullscreen"],
                )
                gallery = gr.Gallery(
                    label="Images in this conversation (click to view)",
                    columns=8,
                    height=150,
                    elem_id="gallery",
                    allow_preview=False,
                    object_fit="contain",
                )
                with gr.Accordion("Boxes", open=True):
                    counts = gr.Markdown(label_summary(Session()), elem_id="box-counts")
                    box_table = gr.Dataframe(
                        headers=BOX_HEADERS,
                        interactive=False,
                        max_height=260,
                        elem_id="box-table",
                        wrap=True,
                        column_widths=["7%", "20%", "19%", "9%", "27%", "18%"],
                    )
                    label_filter = gr.CheckboxGroup(label="Show labels", choices=[], elem_id="label-filter")
                    with gr.Row():
                        new_label = gr.Textbox(placeholder="New label for the selected box", show_label=False, scale=3)
                        rename_button = gr.Button("Rename", size="sm", scale=1)
                        delete_button = gr.Button("Delete", size="sm", scale=1)
                    with gr.Row():
                        json_button = gr.Button("Export JSON", size="sm")
                        coco_button = gr.Button("Export COCO", size="sm")
                        png_button = gr.Button("Export PNG", size="sm")
                    download = gr.File(label="Download", interactive=False, elem_id="download", visible=False)
                with gr.Accordion("Raw output (the model's exact text and rejected spans)", open=False):
                    raw = gr.Code(label="Model text", language=None, lines=6, interactive=False)
            with gr.Column(scale=6):
                chatbot = gr.Chatbot(
                    label="Conversation",
                    height=480,
                    layout="panel",
                    elem_id="chat",
                    buttons=["copy", "copy_all"],
                    feedback_options=None,
                    sanitize_html=True,
                )
                notice = gr.Markdown(visible=False, elem_id="notice")
                keep_button = gr.Button("Keep only the active image", visible=False, size="sm")
                mode = gr.Radio(
                    [m.value for m in Mode],
                    value=Mode.ASK.value,
                    label="Mode",
                    info=" · ".join(f"{m.value}: {h}" for m, h in MODE_HELP.items()),
                )
                textbox = gr.MultimodalTextbox(
                    placeholder="Drop, paste or browse images, then ask. Enter sends, Esc stops.",
                    file_count="multiple",
                    file_types=["image"],
                    sources=["upload"],
                    show_label=False,
                    submit_btn=True,
                    stop_btn=True,
                    elem_id="prompt",
                )
                gr.Markdown(KEYBOARD_HELP, elem_id="keyboard-help")
                with gr.Row():
                    retry_button = gr.Button("Retry", size="sm")
                    undo_button = gr.Button("Undo", size="sm")
                    clear_button = gr.Button("Clear", size="sm")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 1.0, value=0.1, step=0.05, label="Temperature (0 = greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
                    max_new_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens")
        gr.Examples(
            examples=[[{"text": e.text, "files": list(e.files)}, e.mode.value] for e in EXAMPLES],
            example_labels=[e.label for e in EXAMPLES],
            inputs=[textbox, mode],
            cache_examples=False,
            run_on_click=False,
            label="Examples (click to fill the inputs)",
        )

        views = [chatbot, image_view, gallery, raw, notice, keep_button, box_table, label_filter, counts]
        sampling = [temperature, top_p, repetition_penalty, max_new_tokens]
        private = {"api_visibility": "private"}
        model_lane = {"concurrency_id": "model", "concurrency_limit": 1}
        sent = textbox.submit(
            respond, [textbox, mode, *sampling, state], [*views, textbox, state], **model_lane, **private
        )
        retried = retry_button.click(retry, [mode, *sampling, state], [*views, textbox, state], **model_lane, **private)
        # On ZeroGPU the handlers above run in a forked process; the session they return is
        # registered here, in the server's, so that closing the tab finds it.
        for event in (sent, retried):
            event.then(remember_session, [state], None, queue=False, **private)
        # On ZeroGPU the reply runs in another process that the session's cancel event cannot reach;
        # cancelling the event there closes the handler, and `spaces` stops the child's generator.
        stop_cancels = [sent, retried] if on_zerogpu() else None
        textbox.stop(stop, [state], None, queue=False, cancels=stop_cancels, **private)
        undo_button.click(undo, [state], [*views, textbox, state], **private)
        clear_button.click(clear, [state], [*views, state], **private)
        keep_button.click(keep_active, [state], [*views, state], **private)
        gallery.select(select_image, [state], [image_view, state], **private)
        image_view.select(
            pin_click, [state], [image_view, state, pending_click], queue=False, trigger_mode="always_last", **private
        ).then(
            identify_click, [state, pending_click], [*views, state], trigger_mode="always_last", **model_lane, **private
        )
        box_table.select(select_row, [state], [*views, state], **private)
        label_filter.input(filter_labels, [state, label_filter], [*views, state], **private)
        rename_button.click(rename, [state, new_label], [*views, state, new_label], **private)
        new_label.submit(rename, [state, new_label], [*views, state, new_label], **private)
        delete_button.click(delete, [state], [*views, state], **private)
        json_button.click(export("json"), [state], download, **private)
        coco_button.click(export("coco"), [state], download, **private)
        png_button.click(export("png"), [state], download, **private)
        timer.tick(refresh_header, None, [header, timer], **private)
        register_api(controller)
        demo.unload(on_unload)
    return demo
