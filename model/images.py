"""Image ingest: every image is canonicalised once — EXIF orientation applied, RGB — so that all
coordinates (the model's 0–999 values and pixel boxes) refer to the photo as the user sees it."""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # above this, refuse before decoding (decompression-bomb guard)


class ImageError(ValueError):
    """The file is not an image we can read; the message says what to do."""


def canonicalize(image: Image.Image) -> Image.Image:
    """EXIF-transpose and convert to RGB; transparent pixels are composited over white."""
    image = ImageOps.exif_transpose(image) or image
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits rather than clipping everything above 255 to white.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def open_image(
    source: str | os.PathLike[str] | bytes | BinaryIO | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Open a path, bytes, file object or PIL image as a canonical RGB image."""
    if isinstance(source, Image.Image):
        return canonicalize(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        image = Image.open(source)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"the image is {width}×{height} ({width * height / 1e6:.0f} MP), above the {max_pixels / 1e6:.0f} MP "
                "limit; downscale it first"
            )
        image.load()
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"no such file: {source}") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise ImageError("not a readable image (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)") from exc
    except (OSError, SyntaxError) as exc:
        raise ImageError(f"the image file is damaged or truncated ({exc})") from exc
    return canonicalize(image)
