"""DeepSeek-VL2 image preprocessing: canvas choice, pad-to-box, 384×384 tiles, normalisation, token counts.

Everything here mirrors the official ``DeepseekVLV2Processor`` so that the tiles and the number of
``<image>`` placeholders match what the checkpoints were trained on:

* a *global* view: the whole image padded into one tile;
* a *local* view: the image padded into the best canvas among ``candidate_resolutions`` and cut into
  tiles row-major (rows top→bottom, columns left→right) — only when the request holds ≤ 2 images;
* per image, tiles are stored global first, then the locals.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image, ImageOps

TILE_SIZE = 384
PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 2
MAX_CROPPING_IMAGES = 2  # the official processor tiles only when the whole request has at most two images

# [width, height] pairs in the official order; the order matters because ties keep the earlier canvas.
# They are exactly the (384m, 384n) canvases with m·n ≤ 9.
CANDIDATE_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    (384, 1920), (1920, 384), (384, 2304), (2304, 384), (768, 1152), (1152, 768), (384, 2688), (2688, 384),
    (384, 3072), (3072, 384), (768, 1536), (1536, 768), (384, 3456), (3456, 384), (1152, 1152),
)  # fmt: skip

# The official processor pads with int(mean · 255) per channel; with mean 0.5 that is 127, which
# normalises to ≈ −0.0039 rather than exactly 0 — kept for parity with training.
PAD_COLOR: tuple[int, int, int] = (127, 127, 127)


def _check_size(width: int, height: int, what: str = "image") -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"the {what} size must be positive, got {width}×{height}")


def image_token_count(
    num_width_tiles: int,
    num_height_tiles: int,
    *,
    tile_size: int = TILE_SIZE,
    patch_size: int = PATCH_SIZE,
    downsample_ratio: int = DOWNSAMPLE_RATIO,
) -> int:
    """Number of ``<image>`` placeholders one image expands to.

    A tile becomes a side×side token grid (27 ViT patches, zero-padded to 28 and 2×2-merged → 14).
    Layout: global grid rows each followed by a newline token, one view separator, then the local
    tiles stitched into one (nh·side)×(nw·side) grid whose rows also end in a newline token.
    """
    if num_width_tiles <= 0 or num_height_tiles <= 0:
        raise ValueError(f"the tile grid must be positive, got {num_width_tiles}×{num_height_tiles}")
    side = math.ceil((tile_size // patch_size) / downsample_ratio)
    global_tokens = side * (side + 1)
    local_tokens = (num_height_tiles * side) * (num_width_tiles * side + 1)
    return global_tokens + 1 + local_tokens


def select_best_resolution(
    width: int, height: int, candidates: Sequence[Sequence[int]] = CANDIDATE_RESOLUTIONS
) -> tuple[int, int]:
    """The (w, h) canvas that keeps the most of the image's pixels after an aspect-preserving fit.

    Ties on kept pixels go to the canvas wasting the least area; full ties keep the earlier candidate,
    so the list order is part of the contract.
    """
    _check_size(width, height)
    if not candidates:
        raise ValueError("candidate_resolutions is empty")

    def score(candidate: tuple[int, int]) -> tuple[int, int]:
        scale = min(candidate[0] / width, candidate[1] / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        return effective, -(candidate[0] * candidate[1] - effective)

    # max() returns the first of equal maxima, which is the "earlier candidate wins" rule.
    return max(((int(w), int(h)) for w, h in candidates), key=score)


def cropping_enabled(num_images_in_request: int) -> bool:
    """Local tiles are made only when the *whole request* has ≤ 2 images (the official policy)."""
    if num_images_in_request < 1:
        raise ValueError(f"a request needs at least one image, got {num_images_in_request}")
    return num_images_in_request <= MAX_CROPPING_IMAGES


@dataclass(frozen=True)
class TilePlan:
    """How one image is tiled: the local canvas (w, h) and its grid (nw, nh), width first as in
    the official ``images_spatial_crop`` rows."""

    canvas: tuple[int, int]
    grid: tuple[int, int]
    tile_size: int = TILE_SIZE
    patch_size: int = PATCH_SIZE
    downsample_ratio: int = DOWNSAMPLE_RATIO

    @property
    def tiles(self) -> int:
        """Global view plus the local grid."""
        return 1 + self.grid[0] * self.grid[1]

    @property
    def image_tokens(self) -> int:
        return image_token_count(
            *self.grid,
            tile_size=self.tile_size,
            patch_size=self.patch_size,
            downsample_ratio=self.downsample_ratio,
        )


def plan_tiles(
    width: int,
    height: int,
    *,
    num_images: int = 1,
    candidates: Sequence[Sequence[int]] = CANDIDATE_RESOLUTIONS,
    tile_size: int = TILE_SIZE,
    patch_size: int = PATCH_SIZE,
    downsample_ratio: int = DOWNSAMPLE_RATIO,
) -> TilePlan:
    """Tiling of a width×height image in a request holding ``num_images`` images in total."""
    _check_size(width, height)
    if cropping_enabled(num_images):
        canvas = select_best_resolution(width, height, candidates)
    else:
        canvas = (tile_size, tile_size)
    if canvas[0] % tile_size or canvas[1] % tile_size:
        raise ValueError(f"canvas {canvas[0]}×{canvas[1]} is not a multiple of the {tile_size}-px tile")
    return TilePlan(
        canvas=canvas,
        grid=(canvas[0] // tile_size, canvas[1] // tile_size),
        tile_size=tile_size,
        patch_size=patch_size,
        downsample_ratio=downsample_ratio,
    )


def pad_to_box(image: Image.Image, box: tuple[int, int], color: tuple[int, int, int] = PAD_COLOR) -> Image.Image:
    """Aspect-preserving bicubic resize into ``box`` (w, h), centred on a ``color`` background.

    This is ``PIL.ImageOps.pad`` — the official code's call — so resampling and rounding match
    bit for bit. Only for extreme aspect ratios, where PIL would resize a side to 0 px and fail,
    the thin side is kept at 1 px instead.
    """
    box_w, box_h = box
    _check_size(box_w, box_h, "box")
    _check_size(*image.size)
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    if width / height > box_w / box_h:
        resized = (box_w, round(height / width * box_w))
    else:
        resized = (round(width / height * box_h), box_h)
    if min(resized) > 0:
        return ImageOps.pad(image, (box_w, box_h), color=color)
    resized = (max(1, resized[0]), max(1, resized[1]))
    out = Image.new("RGB", (box_w, box_h), color)
    offset = (round((box_w - resized[0]) * 0.5), round((box_h - resized[1]) * 0.5))
    out.paste(image.resize(resized, Image.Resampling.BICUBIC), offset)
    return out


def make_tiles(image: Image.Image, plan: TilePlan, tile_size: int = TILE_SIZE) -> list[Image.Image]:
    """The image's tiles: the global view first, then the local canvas cut row-major."""
    num_w, num_h = plan.grid
    if plan.canvas != (num_w * tile_size, num_h * tile_size):
        raise ValueError(f"plan {plan} does not match a {tile_size}-px tile")
    global_view = pad_to_box(image, (tile_size, tile_size))
    # Without cropping the canvas is one tile, identical to the global view: reuse it.
    local = global_view if plan.canvas == (tile_size, tile_size) else pad_to_box(image, plan.canvas)
    tiles = [global_view]
    for row in range(num_h):
        for col in range(num_w):
            left, top = col * tile_size, row * tile_size
            tiles.append(local.crop((left, top, left + tile_size, top + tile_size)))
    return tiles


def tiles_to_tensor(
    tiles: Sequence[Image.Image],
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> torch.Tensor:
    """Stack RGB tiles as float32 ``[n, 3, T, T]``: /255, then (x − mean)/std per channel.

    The operation order (divide, subtract, divide in float32) is torchvision's ToTensor + Normalize,
    which the official processor uses; with mean = std = 0.5 the range is [−1, 1].
    """
    if not tiles:
        raise ValueError("no tiles to stack")
    if len({tile.size for tile in tiles}) != 1:
        raise ValueError(f"tiles differ in size: {sorted({tile.size for tile in tiles})}")
    rgb = [tile if tile.mode == "RGB" else tile.convert("RGB") for tile in tiles]
    array = np.stack([np.asarray(tile, dtype=np.uint8) for tile in rgb])
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


@dataclass
class ImageProcessorConfig:
    """The image-related fields of the official ``processor_config.json``."""

    candidate_resolutions: tuple[tuple[int, int], ...] = CANDIDATE_RESOLUTIONS
    patch_size: int = PATCH_SIZE
    downsample_ratio: int = DOWNSAMPLE_RATIO
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    normalize: bool = True

    def __post_init__(self) -> None:
        # JSON gives lists; store tuples so plans and configs compare and hash cleanly.
        self.candidate_resolutions = tuple((int(w), int(h)) for w, h in self.candidate_resolutions)
        self.image_mean = tuple(float(v) for v in self.image_mean)  # type: ignore[assignment]
        self.image_std = tuple(float(v) for v in self.image_std)  # type: ignore[assignment]
        if not self.candidate_resolutions:
            raise ValueError("candidate_resolutions is empty")
        for w, h in self.candidate_resolutions:
            _check_size(w, h, "candidate resolution")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need one value per RGB channel")

    @property
    def tile_size(self) -> int:
        """The official processor takes its tile side from the first candidate."""
        return self.candidate_resolutions[0][0]

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> ImageProcessorConfig:
        """Build from a parsed ``processor_config.json``; text-side keys (image_token, sft_format…) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in d.items() if key in known})  # type: ignore[arg-type]


@dataclass
class ProcessedImages:
    """All images of one request: tiles concatenated (per image global first), one (nw, nh) and one
    token count per image."""

    pixel_values: torch.Tensor
    spatial_crop: list[tuple[int, int]]
    image_token_counts: list[int]


class DeepseekVL2ImageProcessor:
    """Turns the images of one request into model tiles; cropping is decided from the request's image count."""

    def __init__(self, config: ImageProcessorConfig | None = None) -> None:
        self.config = config or ImageProcessorConfig()

    def plan(self, image: Image.Image, num_images: int) -> TilePlan:
        config = self.config
        return plan_tiles(
            image.width,
            image.height,
            num_images=num_images,
            candidates=config.candidate_resolutions,
            tile_size=config.tile_size,
            patch_size=config.patch_size,
            downsample_ratio=config.downsample_ratio,
        )

    def __call__(self, images: Sequence[Image.Image]) -> ProcessedImages:
        config = self.config
        size = config.tile_size
        if not images:
            return ProcessedImages(torch.empty((0, 3, size, size), dtype=torch.float32), [], [])
        tiles: list[Image.Image] = []
        crops: list[tuple[int, int]] = []
        counts: list[int] = []
        for image in images:
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            plan = self.plan(rgb, len(images))
            tiles += make_tiles(rgb, plan, size)
            crops.append(plan.grid)
            counts.append(plan.image_tokens)
        mean, std = (config.image_mean, config.image_std) if config.normalize else ((0.0,) * 3, (1.0,) * 3)
        return ProcessedImages(tiles_to_tensor(tiles, mean, std), crops, counts)
