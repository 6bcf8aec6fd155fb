"""Parameters from outside (the typed API, the page's controls) checked one by one.

A client can send any JSON for any parameter. Each check either returns the value in the type the
app works with or raises :class:`UserError` naming the parameter, what was wrong and what is
allowed, so a caller never reads Python's exception text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .modes import Mode

# Far beyond any image this app takes (16,384 px a side), yet finite: coordinates are data, not sizes.
PIXEL_LIMIT = 1e6
NAME_MAX_CHARS = 1000  # an image's file name in a document
TEMPERATURE_MAX = 2.0
# Sampling divides the logits by the temperature: far below this it overflows to inf/NaN. Smaller
# non-zero values are refused rather than silently treated as greedy.
TEMPERATURE_MIN_SAMPLING = 0.01


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def number(name: str, value: Any, low: float, high: float) -> float:
    """A finite number within ``[low, high]`` (booleans and strings are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name} must be a number between {low:g} and {high:g}, not {_kind(value)}.")
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{name} must be between {low:g} and {high:g}; got {value!r}.")
    return float(value)


def integer(name: str, value: Any, low: int, high: int) -> int:
    """A whole number within ``[low, high]`` (``512.0`` counts as whole)."""
    as_number = number(name, value, low, high)
    if not as_number.is_integer():
        raise UserError(f"{name} must be a whole number between {low} and {high}; got {value!r}.")
    return int(as_number)


def temperature(value: Any) -> float:
    """0 (greedy) or a sampling temperature from 0.01 to 2."""
    result = number("temperature", value, 0.0, TEMPERATURE_MAX)
    if 0 < result < TEMPERATURE_MIN_SAMPLING:
        raise UserError(
            f"temperature must be 0 (greedy) or from {TEMPERATURE_MIN_SAMPLING:g} to {TEMPERATURE_MAX:g}; "
            f"got {value!r}."
        )
    return result


def text(name: str, value: Any, max_chars: int | None) -> str:
    """A string of at most ``max_chars`` characters (``None``: the caller checks the length itself)."""
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, not {_kind(value)}.")
    if max_chars is not None and len(value) > max_chars:
        raise UserError(f"{name} is {len(value):,} characters; the limit is {max_chars:,}.")
    return value


def mode(value: Any) -> Mode:
    try:
        return Mode(value)
    except ValueError:
        allowed = ", ".join(f'"{m.value}"' for m in Mode)
        raise UserError(f"mode must be one of {allowed}; got {str(value)[:40]!r}.") from None


def items(name: str, value: Any, max_items: int) -> list:
    """A list (None is an empty one) of at most ``max_items`` entries."""
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise UserError(f"{name} must be a list, not {_kind(value)}.")
    if len(value) > max_items:
        raise UserError(f"{name} has {len(value):,} entries; the limit is {max_items:,}.")
    return list(value)


@dataclass(frozen=True)
class HistoryItem:
    role: str  # "user" or "assistant"
    content: str
    images: list  # file values, still to be checked as uploads


def history(value: Any, *, max_items: int, max_chars: int, max_images: int) -> list[HistoryItem]:
    """``[{"role": "user"|"assistant", "content": str, "images": [file, ...]}]``."""
    out = []
    for index, item in enumerate(items("history", value, max_items)):
        where = f"history[{index}]"
        if not isinstance(item, dict):
            raise UserError(f'{where} must be an object like {{"role": "user", "content": "…"}}, not {_kind(item)}.')
        role = item.get("role")
        if role not in ("user", "assistant"):
            raise UserError(f'{where}.role must be "user" or "assistant"; got {str(role)[:40]!r}.')
        content = text(f"{where}.content", item.get("content", ""), max_chars)
        images = items(f"{where}.images", item.get("images"), max_images)
        if role == "assistant" and images:
            raise UserError(f"{where}: assistant turns cannot carry images.")
        out.append(HistoryItem(role, content, images))
    return out


def xyxy(name: str, value: Any) -> tuple[float, float, float, float]:
    """``[x1, y1, x2, y2]`` in pixels, with x1 ≤ x2 and y1 ≤ y2."""
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise UserError(f"{name} must be [x1, y1, x2, y2] (4 numbers in pixels), not {_kind(value)}.")
    x1, y1, x2, y2 = (number(f"{name}[{i}]", v, -PIXEL_LIMIT, PIXEL_LIMIT) for i, v in enumerate(value))
    if x1 > x2 or y1 > y2:
        raise UserError(f"{name} must have x1 ≤ x2 and y1 ≤ y2; got {list(value)!r}.")
    return x1, y1, x2, y2


def labelled_boxes(value: Any, *, max_boxes: int, max_label_chars: int) -> list[tuple[str, tuple[float, ...]]]:
    """``[{"label": str, "xyxy": [x1, y1, x2, y2]}]`` → ``[(label, xyxy)]``."""
    out = []
    for index, box in enumerate(items("boxes", value, max_boxes)):
        where = f"boxes[{index}]"
        if not isinstance(box, dict):
            raise UserError(f'{where} must be an object like {{"label": "cat", "xyxy": [x1, y1, x2, y2]}}.')
        label = text(f"{where}.label", box.get("label", ""), max_label_chars)
        out.append((label, xyxy(f"{where}.xyxy", box.get("xyxy"))))
    return out


def studio_document(value: Any, *, max_boxes: int, max_label_chars: int) -> dict:
    """A studio JSON document (``/ground``'s ``document`` or the JSON export), checked field by field."""
    if not isinstance(value, dict):
        raise UserError(f"document must be a studio JSON object (from /ground or the JSON export), not {_kind(value)}.")
    # One bound for the whole document: no more images, turns or boxes than /annotate's box limit.
    images = items("document.images", value.get("images"), max_boxes)
    clean_images = []
    for index, image in enumerate(images):
        where = f"document.images[{index}]"
        if not isinstance(image, dict):
            raise UserError(f"{where} must be an object with name, width and height.")
        clean_images.append(
            {
                "index": index,
                "name": text(f"{where}.name", image.get("name", ""), NAME_MAX_CHARS),
                "width": integer(f"{where}.width", image.get("width"), 1, int(PIXEL_LIMIT)),
                "height": integer(f"{where}.height", image.get("height"), 1, int(PIXEL_LIMIT)),
            }
        )
    turns = items("document.turns", value.get("turns"), max_boxes)
    clean_turns, total = [], 0
    for t_index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"document.turns[{t_index}] must be an object with boxes.")
        boxes = []
        for b_index, box in enumerate(items(f"document.turns[{t_index}].boxes", turn.get("boxes"), max_boxes)):
            where = f"document.turns[{t_index}].boxes[{b_index}]"
            if not isinstance(box, dict):
                raise UserError(f"{where} must be an object with label, image_index and xyxy.")
            image_index = box.get("image_index")
            if image_index is not None:
                image_index = integer(f"{where}.image_index", image_index, 0, max(0, len(clean_images) - 1))
                if not clean_images:
                    raise UserError(f"{where}.image_index refers to an image, but document.images is empty.")
            label = text(f"{where}.label", box.get("label", ""), max_label_chars)
            boxes.append(
                {"label": label, "image_index": image_index, "xyxy": list(xyxy(f"{where}.xyxy", box.get("xyxy")))}
            )
        total += len(boxes)
        if total > max_boxes:
            raise UserError(f"document has more than {max_boxes:,} boxes; send it in parts.")
        clean_turns.append({"boxes": boxes})
    return {"images": clean_images, "turns": clean_turns}
