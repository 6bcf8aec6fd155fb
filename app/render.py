"""Boxes drawn onto the original image, in pixels, with labels in any script.

Drawing happens at the image's full resolution (so an exported PNG is exact); line width and
font size scale with the image so boxes read the same on a phone photo and a thumbnail. Labels are
plain text drawn by Pillow — never HTML — with a CJK-capable font when one is installed.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# Distinct, readable on photos, colour-blind-aware ordering (hue steps, alternating lightness).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (0, 130, 200),
    (60, 180, 75),
    (245, 130, 48),
    (145, 30, 180),
    (0, 170, 170),
    (240, 50, 230),
    (170, 110, 40),
    (128, 128, 0),
    (0, 0, 128),
    (255, 200, 0),
    (128, 0, 0),
)

# Fonts that cover Latin, CJK, and more; the first one found wins.
FONT_CANDIDATES = (
    str(ASSETS / "fonts" / "label-font.ttf"),
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Bold.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
)


class ColorBook:
    """One colour per label, stable for a conversation (first seen, first coloured)."""

    def __init__(self, palette: Sequence[tuple[int, int, int]] = PALETTE) -> None:
        self.palette = tuple(palette)
        self.assigned: dict[str, tuple[int, int, int]] = {}

    def color(self, label: str | None) -> tuple[int, int, int]:
        key = label or ""
        if key not in self.assigned:
            self.assigned[key] = self.palette[len(self.assigned) % len(self.palette)]
        return self.assigned[key]

    def hex(self, label: str | None) -> str:
        r, g, b = self.color(label)
        return f"#{r:02x}{g:02x}{b:02x}"


@functools.lru_cache(maxsize=1)
def font_path() -> str | None:
    override = os.environ.get("VL2_LABEL_FONT")
    for candidate in ((override,) if override else ()) + FONT_CANDIDATES:
        if candidate and Path(candidate).exists():
            return candidate
    return None


@functools.lru_cache(maxsize=64)
def load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = font_path()
    if path is None:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


def line_width_for(width: int, height: int) -> int:
    """About 0.5 % of the long side: still 2–3 px after the browser fits the image into the panel."""
    return max(2, round(max(width, height) / 200))


def font_size_for(width: int, height: int) -> int:
    return max(12, round(min(width, height) / 32))


def _contrast_text(color: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = color
    return (0, 0, 0) if (0.299 * r + 0.587 * g + 0.114 * b) > 150 else (255, 255, 255)


def _outline(draw: ImageDraw.ImageDraw, xyxy: tuple[int, int, int, int], color, width: int) -> None:
    """The same pixels as ``draw.rectangle(xyxy, outline=color, width=width)``, 8× faster on big boxes.

    Pillow draws a thick outline one nested rectangle at a time; four filled bands fill whole rows.
    (1000 boxes of 7000 px at the 40 px width of a 64 MP image: 8.0 s against 0.9 s.) Boxes too small
    for four separate bands keep Pillow's own outline, so every box looks exactly as before.
    """
    x1, y1, x2, y2 = xyxy
    if x2 - x1 < 2 * width + 2 or y2 - y1 < 2 * width + 2:
        draw.rectangle(xyxy, outline=color, width=width)
        return
    for band in (
        (x1, y1, x2, y1 + width - 1),
        (x1, y2 - width + 1, x2, y2),
        (x1, y1, x1 + width - 1, y2),
        (x2 - width + 1, y1, x2, y2),
    ):
        draw.rectangle(band, fill=color)


# Drawing text costs by the glyph, and glyphs grow with the image (250 px on an 8000 px photo): 1000
# boxes with 200-character labels took 41 s. Labels are cut to the image's width, and past this many
# characters in one image further boxes are drawn without their label (the data keeps them all).
LABEL_CHARACTERS_PER_IMAGE = 4000


def fit_label(label: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, max_width: float) -> str:
    """``label``, cut with an ellipsis where it would be wider than ``max_width`` pixels."""
    if font.getlength(label) <= max_width:
        return label
    low, high = 0, len(label)  # the longest prefix that fits, with its ellipsis
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(label[:middle] + "…") <= max_width:
            low = middle
        else:
            high = middle - 1
    return label[:low] + "…" if low else ""


def draw_boxes(
    image: Image.Image,
    boxes: Iterable[tuple[tuple[float, float, float, float], str | None]],
    colors: ColorBook,
    *,
    highlight: int | None = None,
    pins: Iterable[tuple[float, float]] = (),
    in_place: bool = False,
) -> Image.Image:
    """A copy of ``image`` with each ``(xyxy, label)`` drawn; ``highlight`` (an index) drawn thicker.

    ``in_place``: draw on ``image`` itself (an RGB image nobody needs unmarked again): a 64 MP
    copy is 192 MB.
    """
    if in_place and image.mode == "RGB":
        canvas = image
    else:
        canvas = image.copy() if image.mode == "RGB" else image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    line = line_width_for(width, height)
    font = load_font(font_size_for(width, height))
    pad = max(2, line)
    characters_left = LABEL_CHARACTERS_PER_IMAGE
    for index, (xyxy, label) in enumerate(boxes):
        color = colors.color(label)
        x1, y1, x2, y2 = (round(v) for v in xyxy)
        thickness = line * 2 if index == highlight else line
        _outline(draw, (x1, y1, x2, y2), color, thickness)
        label = fit_label(label or "", font, width - 2 * pad)
        if not label or len(label) > characters_left:
            continue
        characters_left -= len(label)
        text_box = draw.textbbox((0, 0), label, font=font)
        text_w, text_h = text_box[2] - text_box[0], text_box[3] - text_box[1]
        chip_h = text_h + 2 * pad
        # The label sits on top of the box when there is room, inside it otherwise.
        top = y1 - chip_h if y1 - chip_h >= 0 else y1
        left = min(max(0, x1), max(0, width - text_w - 2 * pad))
        draw.rectangle((left, top, left + text_w + 2 * pad, top + chip_h), fill=color)
        draw.text((left + pad - text_box[0], top + pad - text_box[1]), label, font=font, fill=_contrast_text(color))
    for x, y in pins:
        radius = line * 3
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius), outline=(255, 255, 255), width=line, fill=(230, 25, 75)
        )
    return canvas


def for_display(image: Image.Image, max_side: int = 2048) -> Image.Image:
    """A browser-friendly copy (huge photos are downscaled only for display; boxes stay in original pixels)."""
    if max(image.size) <= max_side:
        return image
    shown = image.copy()
    shown.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return shown
