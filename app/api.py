"""Typed, UI-less endpoints (``gr.api``): one call in, JSON out. Listed on the "Use via API" page."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from model.generation import GenerationSettings
from model.grounding import strip_grounding_tags

from .controller import Controller, UserError
from .modes import Mode
from .session import Session


def _path(file: Any) -> str:
    if isinstance(file, dict):
        return file.get("path") or file.get("name") or ""
    return getattr(file, "path", None) or str(file)


def _box_dicts(session: Session, turn) -> list[dict]:
    image_index = list(session.images).index(turn.target_image) if turn.target_image in session.images else None
    out = []
    for box in turn.boxes:
        item = box.to_dict()
        item["image_index"] = image_index
        out.append(item)
    return out


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
        for item in history or []:
            if item.get("role") == "user":
                refused = controller.ingest(session, [_path(f) for f in item.get("images") or []])
                if refused:
                    raise gr.Error("; ".join(refused))
                turn = session.start_turn(str(item.get("content", "")), str(item.get("content", "")), Mode.ASK)
            elif item.get("role") == "assistant" and session.turns:
                session.update_reply(session.turns[-1], str(item.get("content", "")), final=True)
        refused = controller.ingest(session, [_path(f) for f in images or []])
        if refused:
            raise gr.Error("; ".join(refused))
        try:
            turn = controller.begin(session, message, mode)
        except (UserError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        settings = GenerationSettings(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        try:
            for update in controller.run_turn(session, turn, settings):
                yield {
                    "text": strip_grounding_tags(update.turn.reply),
                    "raw": update.turn.reply,
                    "boxes": _box_dicts(session, update.turn),
                    "rejected": [r.to_dict() for r in update.turn.rejected],
                    "done": update.done,
                    "error": update.turn.error,
                }
        except UserError as exc:
            raise gr.Error(str(exc)) from exc

    gr.api(chat, api_name="chat", concurrency_id="model", concurrency_limit=1)
