"""What the session looks like on screen: chat messages, the annotated image, the raw output.

Everything that reaches the browser as HTML is built here and escaped here: model text and
labels are data, never markup. Escaping HTML is not enough where Markdown is rendered (the chat,
the counts): ``![x](http://host/leak?…)`` in a reply would become an image the browser fetches
with no click. :func:`inert` also turns the characters that start Markdown links, images and
autolinks into character references, which display the same but start nothing.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
import threading
from pathlib import Path

from PIL import Image

from .render import draw_boxes
from .session import Session, Turn

_GROUNDING_SPAN = re.compile(
    r"<\|ref\|>(.*?)<\|/ref\|>\s*(?:<\|det\|>.*?<\|/det\|>)?|<\|det\|>.*?<\|/det\|>", re.DOTALL
)
_OTHER_TAGS = re.compile(r"<\|/?(?:ref|det|grounding)\|>|<｜end▁of▁sentence｜>")


# Markdown's links and images ([, ], (, ), !), autolinks (http:, www., e-mail @), code and diagrams
# (`), and backslash escapes that could undo the others.
_MARKDOWN_ACTIVE = str.maketrans({c: f"&#{ord(c)};" for c in "[]()!:@`\\"})


def inert(text: str) -> str:
    """``text`` as HTML that shows exactly these characters: no tag, link, image or autolink."""
    return html.escape(text).translate(_MARKDOWN_ACTIVE).replace("www.", "www&#46;").replace("WWW.", "WWW&#46;")


def answer_html(turn: Turn, session: Session) -> str:
    """The reply with each grounded phrase highlighted in its box colour (text escaped).

    A phrase takes the colour of the box drawn for it (so a renamed box keeps them matched); the
    phrase of the selected box is filled solid.
    """
    text = turn.reply
    selected = session.selected_box()
    selected_ref = selected.ref_index if selected is not None and selected in turn.boxes else None
    pieces: list[str] = []
    cursor = 0
    ref_index = -1
    for match in _GROUNDING_SPAN.finditer(text):
        pieces.append(inert(_OTHER_TAGS.sub("", text[cursor : match.start()])))
        ref_index += 1
        label = match.group(1)
        if label is not None:
            label = label.strip()
            drawn = next((b.label for b in turn.boxes if b.ref_index == ref_index and b.label), label)
            color = session.colors.hex(drawn)
            fill = color if ref_index == selected_ref else f"{color}33"
            pieces.append(
                f'<mark style="background:{fill};border-bottom:3px solid {color};padding:0 2px">{inert(label)}</mark>'
            )
        cursor = match.end()
    tail = text[cursor:]
    # An unfinished tag at the end of a streaming reply is hidden until it closes.
    tail = re.sub(r"<\|(?:ref|det)\|>.*$", "", tail, flags=re.DOTALL)
    pieces.append(inert(_OTHER_TAGS.sub("", tail)))
    body = "".join(pieces).strip()
    notes = []
    if turn.boxes:
        notes.append(f"{len(turn.boxes)} box{'es' if len(turn.boxes) != 1 else ''}")
    if turn.rejected:
        notes.append(f"{len(turn.rejected)} malformed span(s) skipped — see Raw output")
    if turn.stopped:
        notes.append("stopped")
    if turn.error:
        notes.append(inert(turn.error))
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
        messages.append({"role": "user", "content": inert(turn.user_text) or "…"})
        messages.append({"role": "assistant", "content": answer_html(turn, session)})
    return messages


def annotated_view(
    session: Session, key: str | None, *, full_resolution: bool = False, in_place: bool = False
) -> Image.Image | None:
    """The image with the visible boxes that belong to it (the selected one thicker) and click pins.

    Sized for the browser, unless ``full_resolution`` (the PNG export, without pins).
    """
    if key is None or key not in session.images:
        return None
    original = session.images[key].image
    shown = original if full_resolution else session.images[key].display
    scale = shown.width / original.width
    selected = session.selected_box()
    boxes: list[tuple[tuple[float, ...], str]] = []
    highlight = None
    for _turn, box in session.boxes_on(key, visible_only=True):
        if box is selected:
            highlight = len(boxes)
        boxes.append((tuple(v * scale for v in box.xyxy), box.label or "object"))
    pins = [] if full_resolution else [(x * scale, y * scale) for x, y in session.pins.get(key, [])]
    return draw_boxes(shown, boxes, session.colors, highlight=highlight, pins=pins, in_place=in_place)


def view_signature(session: Session, key: str | None) -> str:
    """Identifies what ``annotated_view`` would draw, so an unchanged view is never re-sent."""
    boxes = [(box.label, box.xyxy) for _turn, box in session.boxes_on(key, visible_only=True)] if key else []
    selected = session.selected_box()
    chosen = None if selected is None else (selected.label, selected.xyxy)
    state = (key, boxes, chosen, session.pins.get(key or ""), session.colors.assigned)
    return f"{key}-{hashlib.sha1(repr(state).encode()).hexdigest()[:16]}"


def save_atomically(image: Image.Image, path: Path) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    image.save(staging, format="PNG", compress_level=1)
    os.replace(staging, path)


def prune_views(folder: Path, keep: tuple[str | None, ...]) -> None:
    """Delete the folder's view files other than those of the signatures in ``keep``."""
    wanted = {f"view-{signature}.png" for signature in keep if signature}
    for path in folder.glob("view-*.png"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)


def annotated_view_file(session: Session, key: str | None, out_dir: Path) -> str | None:
    """The annotated view as a PNG under a content-derived name.

    Handing Gradio a finished file (rather than a PIL image it re-encodes into the same cache
    path on every update) means a browser never downloads a half-rewritten image.
    """
    if key is None or key not in session.images:
        return None
    path = out_dir / f"view-{view_signature(session, key)}.png"
    if not path.exists():
        save_atomically(annotated_view(session, key), path)
    return str(path)


def box_rows(session: Session) -> list[list]:
    """The box panel: one row per box of the conversation."""
    keys = list(session.images)
    rows = []
    for number, turn_index, _box_index, box in session.numbered_boxes():
        key = session.turns[turn_index].target_image
        name = session.images[key].name if key in session.images else "—"
        hidden = (box.label or "object") in session.hidden_labels
        rows.append(
            [
                number,
                (box.label or "object") + (" (hidden)" if hidden else ""),
                f"{keys.index(key) + 1}: {name}" if key in session.images else name,
                turn_index + 1,
                ", ".join(f"{v:.0f}" for v in box.xyxy),
                ", ".join(str(v) for v in box.norm999),
            ]
        )
    return rows


def label_summary(session: Session) -> str:
    counts = session.label_counts()
    if not counts:
        return "No boxes yet — use Find, Grounded answer, or click the image."
    return " · ".join(f"{count} × {inert(label)}" for label, count in counts.items())


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
