"""Typed, UI-less endpoints (``gr.api``): one call in, JSON out. Listed on the "Use via API" page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from model.generation import GenerationSettings
from model.grounding import strip_grounding_tags

from .click import box_from_pixels
from .controller import Controller, UserError
from .exports import box_records, coco_from_document, session_document, write_annotated_png
from .modes import Mode
from .session import Session
from .zerogpu import gpu

GROUNDING_SETTINGS = GenerationSettings(temperature=0.0, repetition_penalty=1.0)


def _path(file: Any) -> str:
    if isinstance(file, dict):
        return file.get("path") or file.get("name") or ""
    return getattr(file, "path", None) or str(file)


def register_api(controller: Controller) -> None:
    """Call inside a ``gr.Blocks`` context."""

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
            images: images for this turn.
            history: earlier turns, ``[{"role": "user"|"assistant", "content": str, "images": [file]}]``.
            mode: "Ask", "Find" or "Grounded answer".
            max_new_tokens: reply length cap.
            temperature: 0 for greedy decoding.
        Returns:
            Partial results ``{"text", "raw", "boxes", "done", "error"}``; boxes carry ``label``, pixel
            ``xyxy`` on the original (EXIF-transposed) image, ``norm999`` and ``image_index``.
        """
        session = Session()
        try:
            for item in history or []:
                if item.get("role") == "user":
                    content = str(item.get("content", ""))
                    controller.accept(session, content, [_path(f) for f in item.get("images") or []], Mode.ASK)
                elif item.get("role") == "assistant" and session.turns:
                    session.update_reply(session.turns[-1], str(item.get("content", "")), final=True)
            turn, _notes = controller.accept(session, message, [_path(f) for f in images or []], mode)
        except (UserError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        settings = GenerationSettings(
            max_new_tokens=controller.limits.clamp_new_tokens(max_new_tokens), temperature=float(temperature)
        )
        first_id = 1 + sum(len(t.boxes) for t in session.turns[:-1])  # ids continue the history's
        try:
            for update in controller.run_turn(session, turn, settings):
                yield {
                    "text": strip_grounding_tags(update.turn.reply),
                    "raw": update.turn.reply,
                    "boxes": box_records(session, update.turn, first_id),
                    "rejected": [r.to_dict() for r in update.turn.rejected],
                    "done": update.done,
                    "error": update.turn.error,
                }
        except UserError as exc:
            raise gr.Error(str(exc)) from exc

    def _one_image(image: Any) -> Session:
        session = Session()
        report = controller.ingest(session, [_path(image)])
        if report.problems:
            raise gr.Error("Could not use " + "; ".join(report.problems))
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
        session = _one_image(image)
        try:
            turn = controller.begin(session, phrase, Mode.FIND)
        except UserError as exc:
            raise gr.Error(str(exc)) from exc
        settings = GROUNDING_SETTINGS.with_max(controller.limits.clamp_new_tokens(max_new_tokens))
        for _update in controller.run_turn(session, turn, settings):
            pass
        if turn.error:
            raise gr.Error(turn.error)
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
        session = _one_image(image)
        try:
            result = controller.identify_click(session, "img1", (float(x), float(y)))
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return {
            "label": result.label,
            "box": {"xyxy": [round(v, 2) for v in result.box.xyxy], "norm999": list(result.box.norm999)},
            "contains_point": result.contains_point,
            "notice": result.notice,
            "raw_text": result.raw_text,
        }

    def to_coco(document: dict) -> dict:
        """Convert a studio JSON document (from /ground or the JSON export) to COCO detections."""
        try:
            return coco_from_document(document)
        except (KeyError, TypeError, IndexError) as exc:
            raise gr.Error(f"not a studio document ({exc.__class__.__name__}: {exc})") from exc

    def annotate(image: gr.FileData, boxes: list[dict]) -> gr.FileData:
        """The image at full resolution with boxes drawn, as PNG.

        Args:
            image: the image.
            boxes: ``[{"label": str, "xyxy": [x1, y1, x2, y2]}]`` in pixels (e.g. /ground's ``boxes``).
        """
        session = _one_image(image)
        turn = session.start_turn("annotate", "annotate", Mode.FIND)
        width, height = session.images["img1"].size
        try:
            turn.boxes = [box_from_pixels(b["label"], b["xyxy"], width, height) for b in boxes]
        except (KeyError, TypeError, ValueError) as exc:
            raise gr.Error(f"each box needs a label and xyxy: {exc}") from exc
        path = write_annotated_png(session, "img1", controller.export_dir(session) / "annotated.png")
        return gr.FileData(path=path, mime_type="image/png")

    # The model-backed endpoints share the UI's single model lane (and get a GPU on ZeroGPU).
    gr.api(gpu(chat), api_name="chat", concurrency_id="model", concurrency_limit=1)
    gr.api(gpu(ground), api_name="ground", concurrency_id="model", concurrency_limit=1)
    gr.api(gpu(identify), api_name="identify", concurrency_id="model", concurrency_limit=1)
    gr.api(to_coco, api_name="to_coco")
    gr.api(annotate, api_name="annotate")
