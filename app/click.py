"""Click-to-ground: a point on the image → a name and a box for the object there.

Strategy (two model calls on a miss, none on a hit):

1. **Cache.** Every box found on an image (by any earlier click, Find or grounded answer) is
   remembered with its label. If some of them contain the click, the smallest one answers at once.
2. **Name it.** Otherwise a square crop centred on the click (40 % of the short side, at least
   160 px) is shown to the model with "what is the object in the centre?", which names the thing
   under the pointer without the rest of the scene competing for attention.
3. **Find it.** That name is grounded on the full image with ``<|ref|>name<|/ref|>``; of the boxes
   returned, the smallest one containing the click wins. If none contains it, the nearest box is
   used and the UI says so; if the model returns no box, the crop itself is the answer (also said).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from model.generation import GenerationSettings
from model.grounding import Box, parse_grounding
from model.processing import Message
from model.prompts import find_prompt

from .backends.base import Backend
from .errors import UserError

NAME_PROMPT = "What is the object in the center of this image? Answer with a short noun phrase only."
CROP_FRACTION = 0.4
MIN_CROP = 160
NAME_SETTINGS = GenerationSettings(max_new_tokens=16, temperature=0.0, repetition_penalty=1.0)
FIND_SETTINGS = GenerationSettings(max_new_tokens=256, temperature=0.0, repetition_penalty=1.0)
_ARTICLE = re.compile(r"^(?:a|an|the|this is|it is|it's)\s+", re.IGNORECASE)


@dataclass(frozen=True)
class ClickResult:
    label: str
    box: Box
    contains_point: bool
    from_cache: bool
    notice: str | None
    raw_text: str  # the model's grounding text (or the cached box's description)
    found: tuple[Box, ...] = ()  # every box the model returned for the name (worth caching)


def box_contains(box: Box, x: float, y: float) -> bool:
    x1, y1, x2, y2 = box.xyxy
    return x1 <= x <= x2 and y1 <= y <= y2


def box_area(box: Box) -> float:
    x1, y1, x2, y2 = box.xyxy
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def distance_to_box(box: Box, x: float, y: float) -> float:
    x1, y1, x2, y2 = box.xyxy
    dx = max(x1 - x, 0.0, x - x2)
    dy = max(y1 - y, 0.0, y - y2)
    return (dx * dx + dy * dy) ** 0.5


def pick_box(boxes: Sequence[Box], x: float, y: float) -> tuple[Box | None, bool]:
    """The smallest box containing the point, else the nearest box; and whether it contains it."""
    containing = [b for b in boxes if box_contains(b, x, y)]
    if containing:
        return min(containing, key=box_area), True
    if not boxes:
        return None, False
    return min(boxes, key=lambda b: (distance_to_box(b, x, y), box_area(b))), False


def crop_around(image: Image.Image, x: float, y: float) -> tuple[Image.Image, tuple[int, int, int, int]]:
    side = max(MIN_CROP, round(CROP_FRACTION * min(image.size)))
    side = min(side, image.width, image.height)
    left = min(max(0, round(x - side / 2)), image.width - side)
    top = min(max(0, round(y - side / 2)), image.height - side)
    region = (left, top, left + side, top + side)
    return image.crop(region), region


def clean_name(text: str) -> str:
    """First line of the answer, without articles, punctuation or runaway length."""
    line = re.sub(r"<[^>]*>", "", text).strip().splitlines()[0] if text.strip() else ""
    line = _ARTICLE.sub("", line.strip(" .,:;!?\"'")).strip(" .,:;!?\"'")
    words = line.split()
    return " ".join(words[:6]) or "object"


def box_from_pixels(label: str, xyxy, width: int, height: int) -> Box:
    """A box given in pixels (e.g. a crop region, or boxes sent to the API), with its 0–999 values."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    x1, x2 = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    y1, y2 = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    norm = (round(x1 / width * 999), round(y1 / height * 999), round(x2 / width * 999), round(y2 / height * 999))
    return Box(label=str(label), norm999=norm, xyxy=(x1, y1, x2, y2), ref_index=0, span=(0, 0))


def _ask(backend: Backend, conversation: list[Message], settings: GenerationSettings) -> str:
    return "".join(backend.stream(conversation, settings))


def identify(backend: Backend, image: Image.Image, x: float, y: float, cached: Sequence[Box] = ()) -> ClickResult:
    """Name and box for the object under pixel ``(x, y)`` of ``image`` (canonical, original size)."""
    if not (0 <= x < image.width and 0 <= y < image.height):
        raise UserError(f"the point ({x:.0f}, {y:.0f}) is outside the {image.width}×{image.height} image")
    hit, inside = pick_box([b for b in cached if b.label], x, y)
    if hit is not None and inside:
        return ClickResult(hit.label or "object", hit, True, True, None, "(from boxes already found on this image)")
    crop, region = crop_around(image, x, y)
    name = clean_name(_ask(backend, [Message("user", NAME_PROMPT, [crop])], NAME_SETTINGS))
    raw = _ask(backend, [Message("user", find_prompt(name), [image])], FIND_SETTINGS)
    found = parse_grounding(raw, image.width, image.height).boxes
    box, inside = pick_box(found, x, y)
    if box is None:
        box = box_from_pixels(name, region, image.width, image.height)
        notice = f"The model named it “{name}” but returned no box; showing the area it described."
        return ClickResult(name, box, True, False, notice, raw, (box,))
    notice = None if inside else f"No box for “{name}” contains your click; showing the nearest one."
    return ClickResult(name, box, inside, False, notice, raw, tuple(found))
