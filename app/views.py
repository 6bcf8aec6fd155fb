"""What the session looks like on screen: chat messages, the annotated image, the raw output.

Everything that reaches the browser as HTML is built here and escaped here: model text and
labels are data, never markup.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import threading
from pathlib import Path

from PIL import Image

from model.grounding import strip_grounding_tags

from .render import draw_boxes, for_display
from .session import Session, Turn

DISPLAY_MAX_SIDE = 2048
_GROUNDING_SPAN = re.compile(
    r"<\|ref\|>(.*?)<\|/ref\|>\s*(?:<\|det\|>.*?<\|/det\|>)?|<\|det\|>.*?<\|/det\|>", re.DOTALL
)
_OTHER_TAGS = re.compile(r"<\|/?(?:ref|det|grounding)\|>|<｜end▁of▁sentence｜>")


def answer_html(turn: Turn, session: Session) -> str:
    """The reply with each grounded phrase highlighted in its box colour (text escaped)."""
    text = turn.reply
    pieces: list[str] = []
    cursor = 0
    for match in _GROUNDING_SPAN.finditer(text):
        pieces.append(html.escape(_OTHER_TAGS.sub("", text[cursor : match.start()])))
        label = match.group(1)
        if label is not None:
            label = label.strip()
            color = session.colors.hex(label)
            pieces.append(
                f'<mark style="background:{color}33;border-bottom:3px solid {color};padding:0 2px">'
                f"{html.escape(label)}</mark>"
            )
        cursor = match.end()
    tail = text[cursor:]
    # An unfinished tag at the end of a streaming reply is hidden until it closes.
    tail = re.sub(r"<\|(?:ref|det)\|>.*$", "", tail, flags=re.DOTALL)
    pieces.append(html.escape(_OTHER_TAGS.sub("", tail)))
    body = "".join(pieces).strip()
    notes = []
    if turn.boxes:
        notes.append(f"{len(turn.boxes)} box{'es' if len(turn.boxes) != 1 else ''}")
    if turn.rejected:
        notes.append(f"{len(turn.rejected)} malformed span(s) skipped — see Raw output")
    if turn.stopped:
        notes.append("stopped")
    if turn.error:
        notes.append(html.escape(turn.error))
    if notes:
        body += f'\n\n<span style="opacity:.7;font-size:.9em">[{" · ".join(notes)}]</span>'
    return body or "…"


def chat_messages(session: Session, image_paths: dict[str, str]) -> list[dict]:
    """Gradio ``messages`` for the chatbot: the user's words and images, then the highlighted reply."""
    messages: list[dict] = []
    for turn in session.turns:
        for key in turn.image_keys:
            if key in image_paths:
                messages.append({"role": "user", "content": {"path": image_paths[key]}})
        messages.append({"role": "user", "content": html.escape(turn.user_text) or "…"})
        messages.append({"role": "assistant", "content": answer_html(turn, session)})
    return messages


def annotated_view(session: Session, key: str | None, *, highlight: int | None = None) -> Image.Image | None:
    """The image with every box of the conversation that belongs to it, sized for the browser."""
    if key is None or key not in session.images:
        return None
    original = session.images[key].image
    shown = for_display(original, DISPLAY_MAX_SIDE)
    scale = shown.width / original.width
    boxes = [(tuple(v * scale for v in box.xyxy), box.label or "object") for _turn, box in session.boxes_on(key)]
    return draw_boxes(shown, boxes, session.colors, highlight=highlight)


def view_signature(session: Session, key: str | None, highlight: int | None = None) -> str:
    """Identifies what ``annotated_view`` would draw, so an unchanged view is never re-sent."""
    boxes = [(box.label, box.xyxy) for _turn, box in session.boxes_on(key)] if key else []
    digest = hashlib.sha1(repr((key, boxes, highlight, session.colors.assigned)).encode()).hexdigest()
    return f"{key}-{digest[:16]}"


def annotated_view_file(
    session: Session, key: str | None, out_dir: Path, *, highlight: int | None = None
) -> str | None:
    """The annotated view saved as a PNG under a content-derived name, written atomically.

    Handing Gradio a finished file (rather than a PIL image it re-encodes into the same cache
    path on every update) means a browser never downloads a half-rewritten image.
    """
    if key is None or key not in session.images:
        return None
    path = out_dir / f"view-{view_signature(session, key, highlight)}.png"
    if not path.exists():
        image = annotated_view(session, key, highlight=highlight)
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        image.save(staging, format="PNG", compress_level=1)
        os.replace(staging, path)
    return str(path)


def raw_output(session: Session) -> str:
    """The model's exact text for the last turn, plus the spans the parser rejected."""
    if not session.turns:
        return ""
    turn = session.turns[-1]
    lines = [turn.reply]
    if turn.rejected:
        lines.append("\n--- rejected spans ---")
        lines += [f"{r.reason}: {r.text}" for r in turn.rejected]
    return "\n".join(lines)


def plain_answer(turn: Turn) -> str:
    return strip_grounding_tags(turn.reply)
