"""The image workspace: one ``gr.HTML`` whose value is the active image and its boxes, as data.

The browser draws the boxes (``app/web/canvas.js``) over the image in an SVG laid out in the
image's own pixels, so a box is exactly where its ``xyxy`` says at any zoom, and an update sends
box coordinates rather than a re-encoded picture. The server-side renderer (``render.py``) is
kept for the full-resolution PNG export.

Test contract: the element has id ``vl2-canvas``; each drawn box is an element inside it with
``data-box-index`` (the 1-based number of the box panel and the 1–9 keys) and ``data-label``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from .examples import Example
from .served import file_url
from .session import Session, SessionImage

WEB = Path(__file__).resolve().parent / "web"
CANVAS_ID = "vl2-canvas"
PANEL_ID = "box-panel"


def _web(name: str) -> str:
    return (WEB / name).read_text(encoding="utf-8")


def canvas_value(
    session: Session, view_url: Callable[[SessionImage], str], examples: Sequence[Example] = ()
) -> dict[str, Any]:
    """What the canvas shows: the active image (original size, served copy), its boxes and pins,
    the conversation's other images, and — with no image yet — the examples to start from."""
    key = session.active_image
    entry = session.images.get(key) if key else None
    selected = session.selected_box()
    boxes = []
    if entry is not None:
        for number, turn_index, _box_index, box in session.numbered_boxes():
            label = box.label or "object"
            if session.turns[turn_index].target_image != key or label in session.hidden_labels:
                continue
            boxes.append(
                {
                    "n": number,
                    "label": label,
                    "color": session.colors.hex(box.label),
                    "xyxy": [round(v, 1) for v in box.xyxy],
                    "norm": list(box.norm999),
                    "selected": box is selected,
                }
            )
    return {
        "image": None
        if entry is None
        else {
            "key": entry.key,
            "name": entry.name,
            "url": view_url(entry),
            "width": entry.size[0],
            "height": entry.size[1],
        },
        "boxes": boxes,
        "pins": [[round(x, 1), round(y, 1)] for x, y in session.pins.get(key or "", [])],
        "images": [
            {"key": e.key, "name": e.name, "url": view_url(e), "active": e.key == key} for e in session.images.values()
        ],
        "examples": []
        if session.images
        else [
            {"index": i, "label": e.label, "text": e.text, "thumb": file_url(e.files[0]), "mode": e.mode.value}
            for i, e in enumerate(examples)
        ],
    }


def build_canvas(value: dict[str, Any]) -> gr.HTML:
    """The workspace component (its events: ``select_box``, ``point``, ``pick_image``, ``example``)."""
    return gr.HTML(
        value,
        html_template=_web("canvas.html"),
        js_on_load=_web("canvas.js"),
        elem_id=CANVAS_ID,
        apply_default_css=False,
        padding=False,
    )


def build_box_panel(value: str) -> gr.HTML:
    """The box list (HTML from ``views.box_panel_html``); a row click selects (event ``select_box``)."""
    return gr.HTML(
        value,
        js_on_load=_web("panel.js"),
        elem_id=PANEL_ID,
        apply_default_css=False,
        max_height=300,
    )


def page_css() -> str:
    return _web("page.css")


def page_js() -> str:
    return _web("page.js")
