"""Typed, UI-less endpoints (``gr.api``): one call in, JSON out. Listed on the "Use via API" page."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import gradio as gr
from gradio.processing_utils import save_bytes_to_cache
from gradio.utils import get_upload_folder

from model.generation import GenerationSettings
from model.grounding import strip_grounding_tags

from . import params
from .click import box_from_pixels
from .controller import Controller, refuse_reserved_tokens
from .errors import UserError
from .exports import annotated_png, box_records, coco_from_document, session_document
from .modes import Mode
from .session import Session
from .zerogpu import gpu

GROUNDING_SETTINGS = GenerationSettings(temperature=0.0, repetition_penalty=1.0)
F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """A :class:`UserError` raised by ``fn`` (or while its stream runs) reaches the caller as ``gr.Error``."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except UserError as exc:
                raise gr.Error(str(exc)) from exc

        return streaming  # type: ignore[return-value]

    @functools.wraps(fn)
    def plain(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc)) from exc

    return plain  # type: ignore[return-value]


def register_api(controller: Controller) -> None:
    """Call inside a ``gr.Blocks`` context."""
    limits = controller.limits
    uploads = controller.uploads
    if uploads is None:
        raise ValueError("the API needs an upload guard (Controller(uploads=...))")

    def new_tokens(value: Any) -> int:
        return params.integer("max_new_tokens", value, 1, limits.max_new_tokens)

    def chat(
        message: str,
        images: list[gr.FileData] | None = None,
        history: list[dict] | None = None,
        mode: str = "Ask",
        max_new_tokens: int = 512,
        temperature: float = 0.0,
    ) -> Iterator[dict]:
        """Stream a reply about images, with boxes as they arrive.

        Args:
            message: the question (Find mode: what to look for).
            images: images for this turn (uploads: ``handle_file`` in gradio_client).
            history: earlier turns, ``[{"role": "user"|"assistant", "content": str, "images": [file]}]``.
            mode: "Ask", "Find" or "Grounded answer".
            max_new_tokens: reply length cap.
            temperature: 0 for greedy decoding, else 0.01 to 2.
        Returns:
            Partial results ``{"text", "raw", "boxes", "done", "error"}``; boxes carry ``label``, pixel
            ``xyxy`` on the original (EXIF-transposed) image, ``norm999`` and ``image_index``.
        """
        # Everything is checked before anything is decoded: types, ranges, the request's size.
        text = params.text("message", message, limits.max_prompt_chars)
        chosen_mode = params.mode(mode)
        settings = GenerationSettings(
            max_new_tokens=new_tokens(max_new_tokens), temperature=params.temperature(temperature)
        )
        earlier = params.history(
            history,
            max_items=limits.max_history_items,
            max_chars=limits.max_prompt_chars,
            max_images=limits.max_images_per_turn,
        )
        files = params.items("images", images, limits.max_images_per_turn)
        paths = [[uploads.api_file(f) for f in item.images] for item in earlier]
        current = [uploads.api_file(f) for f in files]
        session = Session()
        controller.check_budget(session, [p for item_paths in paths for p in item_paths] + current)
        for index, (item, item_paths) in enumerate(zip(earlier, paths, strict=True)):
            try:
                if item.role == "user":
                    controller.accept(session, item.content, item_paths, Mode.ASK)
                else:
                    refuse_reserved_tokens(item.content, "the reply")
                    if session.turns:
                        session.update_reply(session.turns[-1], item.content, final=True)
            except UserError as exc:
                raise UserError(f"history[{index}]: {exc}") from exc
        turn, _notes = controller.accept(session, text, current, chosen_mode)
        first_id = 1 + sum(len(t.boxes) for t in session.turns[:-1])  # ids continue the history's
        for update in controller.run_turn(session, turn, settings):
            yield {
                "text": strip_grounding_tags(update.turn.reply),
                "raw": update.turn.reply,
                "boxes": box_records(session, update.turn, first_id),
                "rejected": [r.to_dict() for r in update.turn.rejected],
                "done": update.done,
                "error": update.turn.error,
            }

    def _one_image(image: Any) -> Session:
        session = Session()
        report = controller.ingest(session, [uploads.api_file(image)])
        if report.problems:
            raise UserError("Could not use " + "; ".join(report.problems))
        return session

    def ground(image: gr.FileData, phrase: str, max_new_tokens: int = 512) -> dict:
        """Boxes for a phrase on one image (greedy decoding).

        Args:
            image: the image (EXIF orientation is applied; coordinates refer to the image as seen).
            phrase: what to find, e.g. "the red car" or "find all apples".
            max_new_tokens: reply length cap.
        Returns:
            ``{"boxes": [{"label", "xyxy", "norm999", ...}], "raw_text": str, "document": <studio JSON>}``.
        """
        phrase = params.text("phrase", phrase, limits.max_prompt_chars)
        settings = GROUNDING_SETTINGS.with_max(new_tokens(max_new_tokens))
        session = _one_image(image)
        turn = controller.begin(session, phrase, Mode.FIND)
        for _update in controller.run_turn(session, turn, settings):
            pass
        if turn.error:
            raise UserError(turn.error)
        document = session_document(session, controller.backend.info)
        return {"boxes": document["turns"][0]["boxes"], "raw_text": turn.reply, "document": document}

    def identify(image: gr.FileData, x: float, y: float) -> dict:
        """Name and box of the object at pixel (x, y) — the API twin of clicking the image.

        Args:
            image: the image (coordinates refer to it after EXIF orientation is applied).
            x: pixel column from the left edge.
            y: pixel row from the top edge.
        Returns:
            ``{"label", "box": {"xyxy", "norm999"}, "contains_point", "notice", "raw_text"}``.
        """
        point = (params.number("x", x, 0, limits.max_side), params.number("y", y, 0, limits.max_side))
        session = _one_image(image)
        result = controller.identify_click(session, "img1", point)
        return {
            "label": result.label,
            "box": {"xyxy": [round(v, 2) for v in result.box.xyxy], "norm999": list(result.box.norm999)},
            "contains_point": result.contains_point,
            "notice": result.notice,
            "raw_text": result.raw_text,
        }

    def to_coco(document: dict) -> dict:
        """Convert a studio JSON document (from /ground or the JSON export) to COCO detections."""
        return coco_from_document(
            params.studio_document(document, max_boxes=limits.max_boxes, max_label_chars=limits.max_label_chars)
        )

    def annotate(image: gr.FileData, boxes: list[dict]) -> gr.FileData:
        """The image at full resolution with boxes drawn, as PNG.

        Args:
            image: the image.
            boxes: ``[{"label": str, "xyxy": [x1, y1, x2, y2]}]`` in pixels (e.g. /ground's ``boxes``);
                at most ``VL2_MAX_BOXES`` (1000), labels up to ``VL2_MAX_LABEL_CHARS`` (200) characters.
        """
        wanted = params.labelled_boxes(boxes, max_boxes=limits.max_boxes, max_label_chars=limits.max_label_chars)
        session = _one_image(image)
        turn = session.start_turn("annotate", "annotate", Mode.FIND)
        width, height = session.images["img1"].size
        turn.boxes = [box_from_pixels(label, xyxy, width, height) for label, xyxy in wanted]
        # Straight into Gradio's upload cache, where it is served from and aged out (delete_cache):
        # the server keeps no file of its own for the call.
        path = save_bytes_to_cache(annotated_png(session, "img1", last_use=True), "annotated.png", get_upload_folder())
        return gr.FileData(path=path, mime_type="image/png")

    # The model-backed endpoints share the UI's single model lane (and get a GPU on ZeroGPU).
    gr.api(gpu(user_errors(chat)), api_name="chat", concurrency_id="model", concurrency_limit=1)
    gr.api(gpu(user_errors(ground)), api_name="ground", concurrency_id="model", concurrency_limit=1)
    gr.api(gpu(user_errors(identify)), api_name="identify", concurrency_id="model", concurrency_limit=1)
    gr.api(user_errors(to_coco), api_name="to_coco")
    gr.api(user_errors(annotate), api_name="annotate")
