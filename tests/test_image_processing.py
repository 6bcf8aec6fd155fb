"""DeepSeek-VL2 image preprocessing against the facts of the reference spec (§4.1–4.3, 4.5, 8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from model.image_processing import (
    CANDIDATE_RESOLUTIONS,
    TILE_SIZE,
    DeepseekVL2ImageProcessor,
    ImageProcessorConfig,
    TilePlan,
    cropping_enabled,
    image_token_count,
    make_tiles,
    pad_to_box,
    plan_tiles,
    select_best_resolution,
    tiles_to_tensor,
)

RED = (255, 0, 0)
GREY = (127, 127, 127)


def solid(width: int, height: int, color: tuple[int, int, int] = RED) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def assemble(tiles: list[Image.Image], grid: tuple[int, int]) -> np.ndarray:
    """Stitch local tiles (row-major) back into the canvas, as an H×W×3 array."""
    num_w, num_h = grid
    rows = [np.concatenate([np.asarray(t) for t in tiles[r * num_w : (r + 1) * num_w]], axis=1) for r in range(num_h)]
    return np.concatenate(rows, axis=0)


def assert_red_placed(view: np.ndarray, size: tuple[int, int], offset: tuple[int, int]) -> None:
    """The red content spans ``size`` at ``offset`` (±1 px at resampling borders); the rest is exact pad grey."""
    (width, height), (x, y) = size, offset
    red = (view[..., 0] > 200) & (view[..., 1] < 60) & (view[..., 2] < 60)
    cols = np.flatnonzero(red.any(axis=0))
    rows = np.flatnonzero(red.any(axis=1))
    assert abs(cols[0] - x) <= 1 and abs(cols[-1] - (x + width - 1)) <= 1, (cols[0], cols[-1])
    assert abs(rows[0] - y) <= 1 and abs(rows[-1] - (y + height - 1)) <= 1, (rows[0], rows[-1])
    outside = np.ones(view.shape[:2], dtype=bool)
    outside[max(0, y - 2) : y + height + 2, max(0, x - 2) : x + width + 2] = False
    assert outside.any() == (size != view.shape[1::-1])
    assert (view[outside] == GREY).all()
    inside = view[y + 2 : y + height - 2, x + 2 : x + width - 2]
    assert (inside == RED).all()


# -- canvas choice and token counts ---------------------------------------------------------------

WORKED_EXAMPLES = [
    # (W, H, (nw, nh), image tokens) — spec §8, cropping on
    (640, 480, (2, 2), 1023),
    (1920, 1080, (4, 2), 1807),
    (384, 384, (1, 1), 421),
    (100, 2000, (1, 6), 1471),
    (480, 640, (2, 2), 1023),
    (1080, 1920, (2, 4), 1835),
    (2000, 100, (6, 1), 1401),
    (800, 600, (3, 2), 1415),
    (1024, 1024, (3, 3), 2017),
    (4000, 3000, (3, 3), 2017),
    (383, 383, (1, 1), 421),
    (385, 385, (2, 2), 1023),
    (768, 768, (2, 2), 1023),
    (1, 1, (1, 1), 421),
]


@pytest.mark.parametrize(("width", "height", "grid", "tokens"), WORKED_EXAMPLES)
def test_worked_examples(width: int, height: int, grid: tuple[int, int], tokens: int) -> None:
    plan = plan_tiles(width, height)
    assert plan.grid == grid
    assert plan.canvas == (grid[0] * TILE_SIZE, grid[1] * TILE_SIZE)
    assert plan.tiles == 1 + grid[0] * grid[1]
    assert plan.image_tokens == tokens == image_token_count(*grid)
    assert select_best_resolution(width, height) == plan.canvas
    # two images still crop
    assert plan_tiles(width, height, num_images=2) == plan


def test_candidate_resolutions_are_all_canvases_up_to_nine_tiles() -> None:
    expected = {(384 * m, 384 * n) for m in range(1, 10) for n in range(1, 10) if m * n <= 9}
    assert len(CANDIDATE_RESOLUTIONS) == 23 == len(set(CANDIDATE_RESOLUTIONS))
    assert set(CANDIDATE_RESOLUTIONS) == expected
    # list order decides ties, so pin it
    assert CANDIDATE_RESOLUTIONS[:8] == (
        (384, 384), (384, 768), (768, 384), (384, 1152), (1152, 384), (384, 1536), (1536, 384), (768, 768),
    )  # fmt: skip
    assert CANDIDATE_RESOLUTIONS[-3:] == ((384, 3456), (3456, 384), (1152, 1152))
    assert max(image_token_count(w // 384, h // 384) for w, h in CANDIDATE_RESOLUTIONS) == 2101


def test_tie_break_prefers_less_waste_then_earlier() -> None:
    # 100×2000: every canvas from 384×2304 upward keeps all pixels; the first (least waste) wins
    assert select_best_resolution(100, 2000) == (384, 2304)
    # full tie between two identical candidates keeps the earlier one (identity by position)
    assert select_best_resolution(10, 10, [(384, 384), (384, 384)]) == (384, 384)
    assert select_best_resolution(10, 10, [(768, 384), (384, 768)]) == (768, 384)
    assert select_best_resolution(10, 10, [(384, 768), (768, 384)]) == (384, 768)
    # equal kept pixels (the whole image fits both): a later, smaller canvas wastes less and wins
    assert select_best_resolution(100, 100, [(768, 768), (384, 384)]) == (384, 384)
    # more kept pixels beats less waste
    assert select_best_resolution(700, 700, [(384, 384), (768, 768)]) == (768, 768)


def test_image_token_count_derives_from_tile_patch_and_downsample() -> None:
    assert image_token_count(1, 1) == 14 * 15 + 1 + 14 * 15 == 421
    assert image_token_count(4, 2) == 211 + 14 * 2 * (14 * 4 + 1)
    # 336-px tiles: 24 patches → 12 tokens a side
    assert image_token_count(1, 1, tile_size=336) == 12 * 13 + 1 + 12 * 13
    # odd patch count rounds up: 27 → 14, 25 → 13
    assert image_token_count(1, 1, tile_size=350) == 13 * 14 + 1 + 13 * 14
    plan = TilePlan(canvas=(672, 336), grid=(2, 1), tile_size=336)
    assert plan.image_tokens == 12 * 13 + 1 + 12 * 25


# -- more than two images -------------------------------------------------------------------------


def test_cropping_policy() -> None:
    assert cropping_enabled(1) and cropping_enabled(2)
    assert not cropping_enabled(3) and not cropping_enabled(10)
    with pytest.raises(ValueError):
        cropping_enabled(0)


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1920, 1080), (100, 2000), (1, 1)])
def test_three_or_more_images_are_not_cropped(width: int, height: int) -> None:
    for num_images in (3, 5):
        plan = plan_tiles(width, height, num_images=num_images)
        assert plan.canvas == (384, 384)
        assert plan.grid == (1, 1)
        assert plan.tiles == 2
        assert plan.image_tokens == 421
    tiles = make_tiles(solid(width, height), plan_tiles(width, height, num_images=3))
    assert len(tiles) == 2
    assert tiles[0].size == tiles[1].size == (384, 384)
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(tiles[1]))


# -- pad to box and placements --------------------------------------------------------------------


def test_pad_to_box_matches_pil_and_rounds_as_specified() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8))
    ours = pad_to_box(image, (1536, 768))
    pil = ImageOps.pad(image, (1536, 768), method=Image.Resampling.BICUBIC, color=GREY, centering=(0.5, 0.5))
    assert np.array_equal(np.asarray(ours), np.asarray(pil))
    # width round((W/H)·768) = 1365, offset round((1536 − 1365)·0.5) = round(85.5) = 86 (half to even)
    view = np.asarray(ours)
    assert (view[:, :86] == GREY).all() and (view[:, 86 + 1365 :] == GREY).all()
    assert not (view[:, 86] == GREY).all() and not (view[:, 86 + 1364] == GREY).all()


def test_pad_to_box_same_aspect_is_a_plain_resize() -> None:
    image = solid(100, 100, (10, 20, 30))
    out = pad_to_box(image, (384, 384))
    assert out.size == (384, 384)
    assert (np.asarray(out) == (10, 20, 30)).all()


def test_pad_to_box_survives_extreme_aspect_ratio() -> None:
    # PIL alone would try a 0-px-wide resize and fail; the thin side is kept at 1 px
    out = np.asarray(pad_to_box(solid(1, 1000), (384, 384)))
    red_cols = np.flatnonzero((out[..., 0] > 200).any(axis=0))
    assert len(red_cols) == 1 and abs(red_cols[0] - 192) <= 1
    assert (out[:, :190] == GREY).all()


def test_pad_to_box_converts_other_modes_to_rgb() -> None:
    out = pad_to_box(Image.new("L", (200, 100), 255), (384, 384))
    assert out.mode == "RGB"
    assert tuple(np.asarray(out)[192, 192]) == (255, 255, 255)
    assert tuple(np.asarray(out)[0, 0]) == GREY


PLACEMENTS = [
    # (W, H, global (size, offset), local canvas (size, offset))
    (640, 480, ((384, 288), (0, 48)), ((768, 576), (0, 96))),
    (1920, 1080, ((384, 216), (0, 84)), ((1365, 768), (86, 0))),
    (100, 2000, ((19, 384), (182, 0)), ((115, 2304), (134, 0))),
    (384, 384, ((384, 384), (0, 0)), ((384, 384), (0, 0))),
]


@pytest.mark.parametrize(("width", "height", "global_view", "local_view"), PLACEMENTS)
def test_placements(width: int, height: int, global_view, local_view) -> None:
    plan = plan_tiles(width, height)
    tiles = make_tiles(solid(width, height), plan)
    assert len(tiles) == plan.tiles
    assert all(tile.size == (384, 384) and tile.mode == "RGB" for tile in tiles)
    assert_red_placed(np.asarray(tiles[0]), *global_view)
    canvas = assemble(tiles[1:], plan.grid)
    assert canvas.shape == (plan.canvas[1], plan.canvas[0], 3)
    assert_red_placed(canvas, *local_view)


# -- tile order -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("grid"), [(2, 2), (3, 3), (4, 2), (1, 6)])
def test_local_tiles_are_row_major(grid: tuple[int, int]) -> None:
    num_w, num_h = grid
    colors = [(20 * (i + 1), 255 - 20 * i, (37 * i) % 256) for i in range(num_w * num_h)]
    image = Image.new("RGB", (num_w * 384, num_h * 384))
    for index, color in enumerate(colors):
        row, col = divmod(index, num_w)  # colours laid out row-major
        image.paste(color, (col * 384, row * 384, (col + 1) * 384, (row + 1) * 384))
    plan = plan_tiles(*image.size)
    assert plan.grid == grid and plan.canvas == image.size  # exact canvas: no resize, no padding
    tiles = make_tiles(image, plan)
    assert len(tiles) == 1 + num_w * num_h
    for tile, color in zip(tiles[1:], colors, strict=True):
        assert (np.asarray(tile) == color).all()
    # tiles[0] is the global view: the whole picture shrunk into one tile
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(pad_to_box(image, (384, 384))))
    global_view = np.asarray(tiles[0]).astype(int)
    scale = 384 / max(image.size)
    offset_x = round((384 - round(image.width * scale)) * 0.5)
    offset_y = round((384 - round(image.height * scale)) * 0.5)
    for index, color in enumerate(colors):
        row, col = divmod(index, num_w)
        x = offset_x + int((col + 0.5) * 384 * scale)
        y = offset_y + int((row + 0.5) * 384 * scale)
        assert np.abs(global_view[y, x] - color).max() <= 2


def test_make_tiles_rejects_inconsistent_plan() -> None:
    with pytest.raises(ValueError):
        make_tiles(solid(10, 10), TilePlan(canvas=(768, 384), grid=(1, 1)))


# -- normalisation --------------------------------------------------------------------------------


def test_normalisation_values() -> None:
    tiles = [solid(384, 384, GREY), solid(384, 384, (255, 255, 255)), solid(384, 384, (0, 0, 0))]
    pixels = tiles_to_tensor(tiles)
    assert pixels.shape == (3, 3, 384, 384) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[0], torch.full_like(pixels[0], -0.00392), atol=1e-5)
    assert pixels[0, 0, 0, 0].item() == pytest.approx((127 / 255 - 0.5) / 0.5, abs=1e-7)
    assert (pixels[1] == 1.0).all()
    assert (pixels[2] == -1.0).all()


def test_normalisation_range_and_channel_order() -> None:
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)
    pixels = tiles_to_tensor([Image.fromarray(array)])
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    expected = (torch.from_numpy(array).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(pixels[0], expected, atol=1e-6)
    channels = tiles_to_tensor([solid(384, 384, (255, 0, 127))])[0, :, 5, 5]
    assert channels.tolist() == pytest.approx([1.0, -1.0, -0.00392], abs=1e-5)


def test_tiles_to_tensor_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        tiles_to_tensor([])
    with pytest.raises(ValueError):
        tiles_to_tensor([solid(384, 384), solid(10, 10)])


# -- processor ------------------------------------------------------------------------------------


def test_processor_one_image() -> None:
    out = DeepseekVL2ImageProcessor()([solid(640, 480)])
    assert out.pixel_values.shape == (5, 3, 384, 384) and out.pixel_values.dtype == torch.float32
    assert out.spatial_crop == [(2, 2)]
    assert out.image_token_counts == [1023]
    assert out.pixel_values.min() >= -1.0 and out.pixel_values.max() <= 1.0


def test_processor_two_images_keep_order_global_first() -> None:
    first, second = solid(640, 480), solid(1920, 1080, (0, 0, 255))
    out = DeepseekVL2ImageProcessor()([first, second])
    assert out.pixel_values.shape == (5 + 9, 3, 384, 384)
    assert out.spatial_crop == [(2, 2), (4, 2)]
    assert out.image_token_counts == [1023, 1807]
    expected = torch.cat(
        [
            tiles_to_tensor(make_tiles(first, plan_tiles(640, 480, num_images=2))),
            tiles_to_tensor(make_tiles(second, plan_tiles(1920, 1080, num_images=2))),
        ]
    )
    assert torch.equal(out.pixel_values, expected)
    assert torch.equal(out.pixel_values[5], tiles_to_tensor([pad_to_box(second, (384, 384))])[0])


def test_processor_three_images_are_padded_only() -> None:
    images = [solid(640, 480), solid(1920, 1080), solid(100, 2000)]
    out = DeepseekVL2ImageProcessor()(images)
    assert out.pixel_values.shape == (6, 3, 384, 384)
    assert out.spatial_crop == [(1, 1)] * 3
    assert out.image_token_counts == [421] * 3
    for index in range(3):
        assert torch.equal(out.pixel_values[2 * index], out.pixel_values[2 * index + 1])


def test_processor_converts_non_rgb_and_handles_no_images() -> None:
    processor = DeepseekVL2ImageProcessor()
    out = processor([Image.new("L", (384, 384), 0)])
    assert out.pixel_values.shape == (2, 3, 384, 384)
    assert (out.pixel_values == -1.0).all()
    empty = processor([])
    assert empty.pixel_values.shape == (0, 3, 384, 384)
    assert empty.spatial_crop == [] and empty.image_token_counts == []


def test_processor_config_from_official_json_and_normalize_off() -> None:
    official = {
        "processor_class": "DeepseekVLV2Processor",
        "candidate_resolutions": [list(c) for c in CANDIDATE_RESOLUTIONS],
        "patch_size": 14,
        "downsample_ratio": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "normalize": True,
        "image_token": "<image>",
        "pad_token": "<｜▁pad▁｜>",
        "add_special_token": False,
        "mask_prompt": False,
        "ignore_id": -100,
        "sft_format": "deepseek",
    }
    config = ImageProcessorConfig.from_dict(official)
    assert config == ImageProcessorConfig()
    assert config.candidate_resolutions == CANDIDATE_RESOLUTIONS
    assert config.tile_size == 384
    raw = DeepseekVL2ImageProcessor(ImageProcessorConfig(normalize=False))([solid(384, 384, GREY)])
    assert raw.pixel_values.min() >= 0.0
    assert raw.pixel_values[0, 0, 0, 0].item() == pytest.approx(127 / 255)


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("width", "height"), [(0, 10), (10, 0), (-1, 5), (0, 0)])
def test_non_positive_sizes_are_rejected(width: int, height: int) -> None:
    with pytest.raises(ValueError):
        select_best_resolution(width, height)
    with pytest.raises(ValueError):
        plan_tiles(width, height)
    with pytest.raises(ValueError):
        pad_to_box(solid(10, 10), (width, height))


def test_zero_size_image_and_bad_grid_are_rejected() -> None:
    with pytest.raises(ValueError):
        DeepseekVL2ImageProcessor()([Image.new("RGB", (0, 10))])
    with pytest.raises(ValueError):
        pad_to_box(Image.new("RGB", (10, 0)), (384, 384))
    with pytest.raises(ValueError):
        image_token_count(0, 1)
    with pytest.raises(ValueError):
        plan_tiles(10, 10, num_images=0)
