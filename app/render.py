"""Boxes drawn onto the original image, in pixels, with labels in any script.

Drawing happens at the image's full resolution (so an exported PNG is exact); line width and
font size scale with the image so boxes read the same on a phone photo and a thumbnail. Labels are
plain text drawn by Pillow — never HTML. Pillow draws what a font lacks as an empty box (tofu), so each
character is drawn with the first font that has it (a label mixing scripts is drawn in runs), and
``font_warning`` tells the page when no font at all can draw part of a label.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from model.environment import read

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

# Fonts that cover Latin, CJK, and more, best first: a label is drawn with the first that has all its
# characters. Any other font file dropped into assets/fonts/ comes right after label-font.ttf.
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


FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# "" stands for Pillow's built-in font (Latin only) where no font file is found.
BUILTIN_FONT = ""


@functools.lru_cache(maxsize=1)
def font_paths() -> tuple[str, ...]:
    """Every font file the renderer draws labels with, best first: VL2_LABEL_FONT, assets/fonts/, FONT_CANDIDATES."""
    dropped = sorted(
        str(path) for path in (ASSETS / "fonts").glob("*") if path.suffix.lower() in FONT_SUFFIXES
    )  # glob of a missing folder is empty
    ordered = [read("VL2_LABEL_FONT") or "", FONT_CANDIDATES[0], *dropped, *FONT_CANDIDATES[1:]]
    return tuple(dict.fromkeys(path for path in ordered if path and Path(path).is_file()))


def font_path() -> str | None:
    """The main label font (the one Latin labels are drawn with); None: Pillow's built-in font."""
    paths = font_paths()
    return paths[0] if paths else None


def _renderer_fonts() -> tuple[str, ...]:
    return font_paths() or (BUILTIN_FONT,)


@functools.lru_cache(maxsize=128)
def _load(path: str, size: int) -> Font:
    if path == BUILTIN_FONT:
        return ImageFont.load_default(size)
    return ImageFont.truetype(path, size)


def load_font(size: int) -> Font:
    return _load(font_path() or BUILTIN_FONT, size)


@functools.lru_cache(maxsize=4096)
def system_fonts_with(char: str) -> tuple[str, ...]:
    """Scalable font files that fontconfig knows to have ``char``; empty where fc-list is missing (macOS, Windows).

    Asked only for characters no font in ``font_paths()`` has, so that a font installed later for a
    script (fonts-noto-core for Thai, say) is used without listing every file of it here.
    """
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        return ()
    try:
        listed = subprocess.run(
            [fc_list, "--format", "%{file}\n", f":scalable=true:charset={ord(char):x}"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    files = {line for line in listed.splitlines() if Path(line).suffix.lower() in FONT_SUFFIXES}
    # Upright sans first (bold, like the default label fonts): a stray serif or italic glyph stands out in a label.
    return tuple(sorted(files, key=_style_rank))[:8]


def _style_rank(path: str) -> tuple[bool, bool, bool, bool, str]:
    name = Path(path).name.lower()
    return ("italic" in name or "oblique" in name, "serif" in name, "mono" in name, "bold" not in name, name)


# A code point no font maps (a noncharacter): every font draws it as its .notdef glyph, the tofu box.
_MISSING = "\U0010ffff"
_PROBE_SIZE = 32


def _glyph_print(font: Font, char: str) -> tuple:
    """How ``font`` draws ``char``: its advance, its box and its pixels."""
    image = Image.new("L", (3 * _PROBE_SIZE, 2 * _PROBE_SIZE))
    ImageDraw.Draw(image).text((_PROBE_SIZE // 2, _PROBE_SIZE // 4), char, font=font, fill=255)
    return font.getlength(char), font.getbbox(char), image.tobytes()


@functools.lru_cache(maxsize=256)
def _probe(path: str) -> tuple[ImageFont.FreeTypeFont, tuple] | None:
    """The font at ``path`` at the probe size, with how it draws a missing character; None: it cannot load."""
    try:
        font = _load(path, _PROBE_SIZE)
    except OSError:  # bitmap-only (colour emoji) or broken: it draws nothing at label sizes
        return None
    if not isinstance(font, ImageFont.FreeTypeFont):  # Pillow built without FreeType: its bitmap font
        return None
    return font, _glyph_print(font, _MISSING)


@functools.lru_cache(maxsize=65536)
def _has_glyph(path: str, char: str) -> bool:
    """Whether the font at ``path`` draws ``char`` as something other than its .notdef glyph.

    Pillow does not expose a font's character map (fontTools would, but is no dependency), so the
    glyph is compared with the one drawn for a code point no font has: a missing character comes
    out as exactly that box. Cached per font and character: the page header asks on every render.
    """
    probe = _probe(path)
    if probe is None:
        # Pillow's bitmap font (no FreeType) draws Latin-1 and nothing else; a font that did not load, nothing.
        return path == BUILTIN_FONT and ord(char) < 0x100
    font, notdef = probe
    return _glyph_print(font, char) != notdef


def _always_drawable(char: str) -> bool:
    """Spaces, controls, format characters and variation selectors: no font needs a visible glyph for them."""
    return (
        char.isspace()
        or unicodedata.category(char) in ("Cc", "Cf", "Zs", "Zl", "Zp")
        or "\ufe00" <= char <= "\ufe0f"
        or "\U000e0100" <= char <= "\U000e01ef"
    )


def _font_for(char: str, paths: tuple[str, ...]) -> str | None:
    """The first of ``paths``, else of the system's fonts, that draws ``char``; None: no font can."""
    for path in paths:
        if _has_glyph(path, char):
            return path
    for path in system_fonts_with(char):
        if _has_glyph(path, char):
            return path
    return None


def undrawable_characters(text: str) -> str:
    """The characters of ``text`` (each once, in order) that no font available to the renderer can draw."""
    paths = _renderer_fonts()
    return "".join(
        char for char in dict.fromkeys(text) if not _always_drawable(char) and _font_for(char, paths) is None
    )


def _runs(text: str, paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """``text`` cut into ``(part, font path)`` runs: one run when a single font has every character."""
    needed = [char for char in set(text) if not _always_drawable(char)]
    for path in paths:  # a Latin label stops at the first font, after one cached look-up per character
        if all(_has_glyph(path, char) for char in needed):
            return [(text, path)]
    runs: list[list[str]] = []
    for char in text:
        # A character stays in the current run while its font has it, so runs stay few and
        # punctuation and spaces keep the font of the text around them.
        if runs and (_always_drawable(char) or _has_glyph(runs[-1][1], char)):
            runs[-1][0] += char
            continue
        path = paths[0] if _always_drawable(char) else _font_for(char, paths)
        if path is None and runs:  # no font has it: tofu in the current font
            runs[-1][0] += char
            continue
        runs.append([char, path or paths[0]])
    return [(part, path) for part, path in runs]


class LabelFonts:
    """The renderer's fonts at one pixel size: each part of a label is drawn with a font that has it.

    Duck-types the ``getlength`` of a Pillow font, so ``fit_label`` measures a label drawn in runs.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.paths = _renderer_fonts()
        self._last: tuple[str, list[tuple[str, Font]]] | None = None

    def runs(self, text: str) -> list[tuple[str, Font]]:
        # draw_boxes measures a label (fit_label) and then draws the same text: split it once.
        if self._last is None or self._last[0] != text:
            self._last = (text, [(part, _load(path, self.size)) for part, path in _runs(text, self.paths)])
        return self._last[1]

    def getlength(self, text: str) -> float:
        return sum(font.getlength(part) for part, font in self.runs(text))


_CJK_WORDS = frozenset({"CJK", "IDEOGRAPHIC", "KANGXI", "FULLWIDTH", "HALFWIDTH"})
_CJK_FAMILY = frozenset({"CJK", "HANGUL", "HIRAGANA", "KATAKANA", "BOPOMOFO"})


def script_of(char: str) -> str:
    """A rough name for the script or kind of ``char``: "CJK", "HANGUL", "ARABIC", "emoji", "private use"…

    The first word of the character's Unicode name is the script for letters, marks and digits
    ("THAI CHARACTER KO KAI"); symbols and punctuation are named by kind instead ("BLACK STAR").
    """
    category = unicodedata.category(char)
    code = ord(char)
    name = unicodedata.name(char, "")
    if category == "Co":
        return "private use"
    if category == "Cn" or not name:
        return "unassigned"
    word = name.split()[0]
    if word in _CJK_WORDS or 0x3000 <= code <= 0x303F:
        return "CJK"
    if category[0] in "SP":
        if 0x1F000 <= code <= 0x1FAFF or 0x2600 <= code <= 0x27BF:
            return "emoji"
        return "symbol" if category[0] == "S" else "punctuation"
    return word


def _shown(char: str) -> str:
    """``char`` as the warning shows it: itself, or its code point where it would be invisible on its own."""
    category = unicodedata.category(char)
    return char if category[0] in "LNPS" else f"U+{ord(char):04X}"  # marks, private use, unassigned: by number


def font_warning(labels: Iterable[str | None], shown: int = 5) -> str | None:
    """A sentence for the page header when no font can draw some characters of ``labels``; None when all draw.

    Plain text (the caller escapes it), naming at most ``shown`` characters, grouped by script.
    """
    missing = "".join(dict.fromkeys("".join(undrawable_characters(label or "") for label in labels)))
    if not missing:
        return None
    groups: dict[str, list[str]] = {}
    for char in missing[:shown]:
        groups.setdefault(script_of(char), []).append(_shown(char))
    listed = ", ".join(f"{' '.join(chars)} ({script})" for script, chars in groups.items())
    if len(missing) > shown:
        listed += f" and {len(missing) - shown} more"
    scripts = {script_of(char) for char in missing}
    packages = []
    if scripts & _CJK_FAMILY:
        packages.append("fonts-noto-cjk")
    if scripts - _CJK_FAMILY - {"emoji", "symbol", "private use", "unassigned"}:
        packages.append("fonts-noto-core")
    if scripts & {"emoji", "symbol"}:
        packages.append("fonts-symbola")
    advice = "put a .ttf/.otf font that has them in assets/fonts/ (or set VL2_LABEL_FONT)."
    advice = f"Install {' or '.join(packages)} (apt) or {advice}" if packages else advice.capitalize()
    return f"No installed font can draw {listed} in box labels: the exported PNG would show empty boxes there. {advice}"


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


def fit_label(label: str, font: Font | LabelFonts, max_width: float) -> str:
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


def _lay_out(
    draw: ImageDraw.ImageDraw, runs: list[tuple[str, Font]]
) -> tuple[list[tuple[float, str, Font, str | None]], tuple[float, float, float, float]]:
    """Each run with its x offset and anchor, and the box of them all, drawn from (0, 0).

    One run is drawn exactly as before runs existed (top-left anchor); several share a baseline
    ("ls"), since fonts of different scripts have different ascents.
    """
    anchor = "ls" if len(runs) > 1 else None
    placed, x = [], 0.0
    boxes = []
    for part, font in runs:
        placed.append((x, part, font, anchor))
        boxes.append(draw.textbbox((x, 0), part, font=font, anchor=anchor))
        if anchor:  # the next run starts where this one ends
            x += font.getlength(part)
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return placed, box


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
    fonts = LabelFonts(font_size_for(width, height))
    pad = max(2, line)
    characters_left = LABEL_CHARACTERS_PER_IMAGE
    for index, (xyxy, label) in enumerate(boxes):
        color = colors.color(label)
        x1, y1, x2, y2 = (round(v) for v in xyxy)
        thickness = line * 2 if index == highlight else line
        _outline(draw, (x1, y1, x2, y2), color, thickness)
        label = fit_label(label or "", fonts, width - 2 * pad)
        if not label or len(label) > characters_left:
            continue
        characters_left -= len(label)
        runs, text_box = _lay_out(draw, fonts.runs(label))
        text_w, text_h = text_box[2] - text_box[0], text_box[3] - text_box[1]
        chip_h = text_h + 2 * pad
        # The label sits on top of the box when there is room, inside it otherwise.
        top = y1 - chip_h if y1 - chip_h >= 0 else y1
        left = min(max(0, x1), max(0, width - text_w - 2 * pad))
        draw.rectangle((left, top, left + text_w + 2 * pad, top + chip_h), fill=color)
        for x, part, font, anchor in runs:
            draw.text(
                (left + pad - text_box[0] + x, top + pad - text_box[1]),
                part,
                font=font,
                anchor=anchor,
                fill=_contrast_text(color),
            )
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
