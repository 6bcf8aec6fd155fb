"""The Gradio page. Only wiring lives here; behaviour is in ``controller.py`` and ``views.py``."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from model.generation import GenerationSettings

from .api import register_api
from .backends.base import Backend
from .controller import Controller, UserError
from .examples import EXAMPLES
from .modes import MODE_HELP, Mode
from .session import Session
from .views import annotated_view_file, chat_messages, raw_output, view_signature
from .zerogpu import gpu

TITLE = "VL2 Grounding Studio"
SESSION_TTL_SECONDS = 2 * 3600
CSS = """
#header h1 {margin-bottom: 0}
#notice {border-left: 4px solid #f5a623; padding-left: 8px}
#chat img {max-height: 200px; width: auto}
#gallery .thumbnail-item {height: 84px}
"""


def header_markdown(backend: Backend) -> str:
    info = backend.info
    status = getattr(backend, "status", "ready")
    line = f"**Model:** `{info.model_id}` · **precision:** {info.precision} · **device:** {info.device}"
    if status != "ready":
        line += f"\n\n⏳ {status}"
    return f"# {TITLE}\nSee what DeepSeek-VL2 sees: ask about images, find objects, get answers with boxes.\n\n{line}"


def _cancel_session(session: Session | None) -> None:
    if session is not None:
        session.cancel_event.set()


def build_demo(backend: Backend, *, image_dir: str | Path | None = None) -> gr.Blocks:
    controller = Controller(backend, image_dir=image_dir)
    live_sessions: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()

    def session_of(session: Session | None, request: gr.Request | None) -> Session:
        if session is None:
            session = Session()
        if request is not None and request.session_hash:
            live_sessions[request.session_hash] = session
        return session

    def gallery_items(session: Session) -> list[tuple[str, str]]:
        return [(controller.image_path(session, k), f"{k}: {e.name}") for k, e in session.images.items()]

    def view_update(session: Session):
        """The annotated image, or ``gr.skip()`` when the browser already shows exactly that."""
        key = session.active_image
        signature = view_signature(session, key) if key else None
        if signature == session.shown_view:
            return gr.skip()
        session.shown_view = signature
        return annotated_view_file(session, key, controller.image_dir / session.session_id)

    def render_all(session: Session, notice: str = ""):
        return (
            chat_messages(session, controller.image_paths(session)),
            view_update(session),
            gallery_items(session),
            raw_output(session),
            gr.update(value=notice, visible=bool(notice)),
            gr.update(visible=session.image_count_after_send() >= 3),
        )

    @gpu
    def respond(
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
        message = message or {}
        problems = controller.ingest(session, message.get("files") or [])
        for problem in problems:
            gr.Warning(problem)
        try:
            turn = controller.begin(session, message.get("text", ""), mode)
        except UserError as exc:
            gr.Warning(str(exc))
            # Keep what the user typed; uploaded images stay pending for the next question.
            yield (*render_all(session), gr.update(value={"text": message.get("text", ""), "files": []}), session)
            return
        settings = GenerationSettings(
            temperature=float(temperature),
            top_p=float(top_p),
            repetition_penalty=float(repetition_penalty),
            max_new_tokens=int(max_new_tokens),
        )
        cleared = gr.update(value={"text": "", "files": []})
        try:
            updates = controller.run_turn(session, turn, settings)
            notice = ""
            for update in updates:
                if update.notices:
                    notice = "\n\n".join(update.notices)
                view = view_update(session) if update.boxes_changed else gr.skip()
                yield (
                    chat_messages(session, controller.image_paths(session)),
                    view,
                    gallery_items(session) if update.done or update.notices else gr.skip(),
                    raw_output(session),
                    gr.update(value=notice, visible=bool(notice)),
                    gr.update(visible=session.image_count_after_send() >= 3),
                    cleared,
                    session,
                )
        except UserError as exc:
            gr.Warning(str(exc))
            yield (*render_all(session), gr.update(value={"text": message.get("text", ""), "files": []}), session)

    def stop(session: Session | None) -> None:
        if session is not None:
            controller.stop(session)

    def select_image(session: Session | None, event: gr.SelectData):
        session = session or Session()
        keys = list(session.images)
        if 0 <= event.index < len(keys):
            session.active_image = keys[event.index]
        return view_update(session), session

    def keep_active(session: Session | None):
        session = session or Session()
        if session.active_image:
            session.keep_only(session.active_image)
            gr.Info("Kept only the active image; ask your next question about it.")
        return (*render_all(session), session)

    def undo(session: Session | None):
        session = session or Session()
        turn = session.undo()
        text = turn.user_text if turn else ""
        return (*render_all(session), gr.update(value={"text": text, "files": []}), session)

    def clear(session: Session | None):
        _cancel_session(session)
        return (*render_all(Session()), Session())

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
        last = session.undo()
        if last is None:
            yield (*render_all(session), gr.skip(), session)
            return
        text = {"text": last.user_text, "files": []}
        yield from respond(
            text, last.mode.value, temperature, top_p, repetition_penalty, max_new_tokens, session, request
        )

    def on_unload(request: gr.Request) -> None:
        _cancel_session(live_sessions.get(request.session_hash))

    def refresh_header():
        ready = getattr(backend, "status", "ready") == "ready" or "failed" in getattr(backend, "status", "")
        return header_markdown(backend), gr.Timer(active=not ready)

    with gr.Blocks(title=TITLE, delete_cache=(3600, 3600)) as demo:
        state = gr.State(None, time_to_live=SESSION_TTL_SECONDS, delete_callback=_cancel_session)
        header = gr.Markdown(header_markdown(backend), elem_id="header")
        timer = gr.Timer(1.0, active=getattr(backend, "status", "ready") != "ready")
        with gr.Row(equal_height=False):
            with gr.Column(scale=5):
                image_view = gr.Image(
                    label="Image and boxes",
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
                    placeholder="Drop, paste or browse images, then ask. Enter sends.",
                    file_count="multiple",
                    file_types=["image"],
                    sources=["upload"],
                    show_label=False,
                    submit_btn=True,
                    stop_btn=True,
                )
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

        view_outputs = [chatbot, image_view, gallery, raw, notice, keep_button]
        sampling = [temperature, top_p, repetition_penalty, max_new_tokens]
        submit = textbox.submit(
            respond,
            [textbox, mode, *sampling, state],
            [*view_outputs, textbox, state],
            concurrency_id="model",
            concurrency_limit=1,
            api_visibility="private",
        )
        textbox.stop(stop, [state], None, queue=False, api_visibility="private")
        retry_button.click(
            retry,
            [mode, *sampling, state],
            [*view_outputs, textbox, state],
            concurrency_id="model",
            concurrency_limit=1,
            api_visibility="private",
        )
        undo_button.click(undo, [state], [*view_outputs, textbox, state], api_visibility="private")
        clear_button.click(clear, [state], [*view_outputs, state], api_visibility="private")
        keep_button.click(keep_active, [state], [*view_outputs, state], api_visibility="private")
        gallery.select(select_image, [state], [image_view, state], api_visibility="private")
        timer.tick(refresh_header, None, [header, timer], api_visibility="private")
        register_api(controller)
        demo.unload(on_unload)
        demo.submit_event = submit  # kept for tests and for later cancel wiring
    return demo
