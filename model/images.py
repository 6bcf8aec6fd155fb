"""Image ingest: every image is canonicalised once — EXIF orientation applied, RGB — so that all
coordinates (the model's 0–999 values and pixel boxes) refer to the photo as the user sees it.

Bad files are refused with a message that says what to do, sorted into categories the app can
act on: ``empty``, ``not_an_image``, ``unsupported`` (SVG, PDF, HEIC without its plugin),
``damaged``, ``too_large`` and ``bad_shape`` (the last two checked from the header, before any pixel
is decoded).
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from .environment import read_int

DEFAULT_MAX_PIXELS = read_int("VL2_MAX_PIXELS", 64_000_000)
# Work grows with the longest side too (drawing, tiling), not only with the pixel count: a 1×64,000,000
# strip is "64 MP" but costs minutes. Both are checked from the header.
DEFAULT_MAX_SIDE = 16_384
DEFAULT_MAX_ASPECT = 200
# Pillow's own bomb check (an error at twice its limit) must never fire before ours does.
Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, DEFAULT_MAX_PIXELS)

try:  # HEIC/HEIF (iPhone photos) when the optional plugin is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
    HEIF_SUPPORTED = True
except ImportError:
    HEIF_SUPPORTED = False


DAMAGED = "the image file is damaged or truncated; save it again or export it as PNG or JPEG"


class ImageError(ValueError):
    """The file is not an image we can read; ``category`` says why, the message what to do."""

    def __init__(self, message: str, category: str) -> None:
        super().__init__(message)
        self.category = category


@dataclass
class IngestedImage:
    image: Image.Image
    notes: list[str] = field(default_factory=list)  # things the user should know, e.g. "first frame only"


def canonicalize(image: Image.Image, *, owned: bool = False) -> Image.Image:
    """EXIF-transpose and convert to RGB; transparent pixels are composited over white.

    ``owned``: the image was just opened for us and may be changed in place. A 64 MP photo is
    192 MB decoded; each needless copy would hold another 192 MB at the peak.
    """
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if owned:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        # Pasted over white with its own alpha as the mask: two full-size images at the peak, where
        # compositing two RGBA images and converting the result held four.
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, (0, 0), rgba)
        return white
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clipping everything above 255 to white.
        image = image.point(lambda v: v / 256).convert("L")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image if owned else image.copy()


def _sniff_unsupported(head: bytes) -> str | None:
    text = head.lstrip()[:256].lower()
    if text.startswith(b"%pdf"):
        return "PDF files are documents, not images: export the page you want as PNG or JPEG"
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in head.lower()):
        return "SVG is a vector format: export it as PNG first"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypheif", b"ftyphevc"):
        return "HEIC photos need the pillow-heif package (`pip install pillow-heif`), or export the photo as JPEG"
    return None


@dataclass(frozen=True)
class ShapeLimits:
    """What an image may measure, checked from its header before any pixel is decoded."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_aspect: int = DEFAULT_MAX_ASPECT

    def check(self, width: int, height: int) -> None:
        if width * height > self.max_pixels:
            raise ImageError(
                f"the image is {width}×{height} ({width * height / 1e6:.0f} MP), above the "
                f"{self.max_pixels / 1e6:.0f} MP limit; downscale it first",
                "too_large",
            )
        if max(width, height) > self.max_side:
            raise ImageError(
                f"the image is {width}×{height}; its longest side is above the {self.max_side:,} px limit. "
                "Downscale it first",
                "too_large",
            )
        if max(width, height) > self.max_aspect * max(1, min(width, height)):
            raise ImageError(
                f"the image is {width}×{height}, more elongated than 1:{self.max_aspect}; crop it to the part "
                "you want to ask about",
                "bad_shape",
            )


def _open_checked(source: str | os.PathLike[str] | BinaryIO, limits: ShapeLimits) -> Image.Image:
    """Open ``source`` lazily (header only) and check its size; errors become :class:`ImageError`."""
    head = b""
    try:
        if isinstance(source, str | os.PathLike):
            if os.path.getsize(source) == 0:
                raise ImageError("the file is empty (0 bytes)", "empty")
            with open(source, "rb") as handle:
                head = handle.read(512)
        else:
            position = source.tell()
            head = source.read(512)
            source.seek(position)
            if not head:
                raise ImageError("the file is empty (0 bytes)", "empty")
        image = Image.open(source)
        limits.check(*image.size)
        return image
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"no such file: {source}", "not_an_image") from exc
    except Image.DecompressionBombError as exc:
        # Pillow refuses far-too-large headers at open(); say it in the same words as our own check.
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)) / 1e6:.0f} MP" if pixels else "too many pixels"
        raise ImageError(
            f"the image is {size}, above the {limits.max_pixels / 1e6:.0f} MP limit; downscale it first", "too_large"
        ) from exc
    except UnidentifiedImageError as exc:
        reason = _sniff_unsupported(head)
        if reason:
            raise ImageError(reason, "unsupported") from exc
        raise ImageError("not a readable image (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)", "not_an_image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(DAMAGED, "damaged") from exc


def probe_image(source: str | os.PathLike[str], limits: ShapeLimits | None = None) -> tuple[int, int]:
    """The stored size of an image file, from its header alone (its limits checked).

    EXIF orientation is not applied: it may swap the sides, never change the pixel count, and
    reading it can decode the whole image (Pillow looks for a PNG's EXIF after the pixel data).
    """
    with _open_checked(source, limits or ShapeLimits()) as image:
        return image.size


def ingest_image(
    source: str | os.PathLike[str] | bytes | BinaryIO | Image.Image,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    limits: ShapeLimits | None = None,
) -> IngestedImage:
    """Open a path, bytes, file object or PIL image as a canonical RGB image, with notes.

    ``limits`` (or, for the pixel count alone, ``max_pixels``) bounds what is decoded.
    """
    if isinstance(source, Image.Image):
        return IngestedImage(canonicalize(source))
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    limits = limits or ShapeLimits(max_pixels=max_pixels)
    image = _open_checked(source, limits)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(DAMAGED, "damaged") from exc
    notes = []
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated image: using the first of its {frames} frames")
    # A single frame is read whole and its file closed by load(), so the decoded image can be used
    # as it is; a multi-frame file stays open for its other frames: copy the first, close the file.
    canonical = canonicalize(image, owned=frames == 1)
    if canonical is not image:
        image.close()
    return IngestedImage(canonical, notes)


def open_image(
    source: str | os.PathLike[str] | bytes | BinaryIO | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open a path, bytes, file object or PIL image as a canonical RGB image."""
    return ingest_image(source, max_pixels=max_pixels).image
