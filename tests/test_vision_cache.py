"""Vision features are computed once per image (model/vision_cache.py): hits, misses, eviction,
and answers identical to computing them again, for all three variants."""

from __future__ import annotations

import contextlib

import pytest
import torch

from model.generation import GenerationSettings, generate_text
from model.processing import Message
from model.vision_cache import VisionFeatureCache

from .test_model_forward import _gradient_image

GREEDY = GenerationSettings(temperature=0, max_new_tokens=8, min_new_tokens=8)


def test_least_recently_used_entries_go_first_and_the_budget_holds():
    entry = torch.zeros(256)  # 1 KiB of fp32
    cache = VisionFeatureCache(budget_bytes=3 * 1024)
    for key in "abc":
        cache.put(key, entry.clone())
    assert cache.get("a") is not None  # "a" is now the most recently used
    cache.put("d", entry.clone())  # over budget: the least recently used ("b") goes
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    stats = cache.stats()
    assert stats.entries == 3 and stats.bytes_held == 3 * 1024 <= stats.budget_bytes
    assert (stats.hits, stats.misses) == (4, 1)
    cache.put("huge", torch.zeros(4096))  # bigger than the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and cache.stats().entries == 3


def test_the_environment_sets_the_budget_or_turns_the_cache_off(monkeypatch):
    monkeypatch.setenv("VL2_VISION_CACHE_MB", "0")
    assert VisionFeatureCache.from_env() is None
    monkeypatch.setenv("VL2_VISION_CACHE_MB", "1.5")
    assert VisionFeatureCache.from_env().budget_bytes == int(1.5 * 2**20)


@contextlib.contextmanager
def counting_tower_calls(model):
    """How many tiles go through the vision tower while the block runs."""
    seen = []
    handle = model.vision.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    try:
        yield seen
    finally:
        handle.remove()


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_a_repeated_image_skips_the_tower_and_answers_the_same(loaded_fp32, variant):
    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    assert isinstance(model.vision_cache, VisionFeatureCache)  # installed by load_model
    model.vision_cache.clear()
    photo, other = _gradient_image(640, 480), _gradient_image(300, 500)
    first = [Message("user", "What is this?", [photo])]
    with counting_tower_calls(model) as tiles:
        cold = generate_text(model, processor, first, GREEDY)
    assert sum(tiles) == 5  # a 2×2 grid and its global view
    hits = model.vision_cache.hits
    # A follow-up about the same photo: no tile goes through the tower, and the answer is the same.
    follow_up = [*first, Message("assistant", cold), Message("user", "And its colour?")]
    with counting_tower_calls(model) as tiles:
        warm = generate_text(model, processor, follow_up, GREEDY)
    assert tiles == [] and model.vision_cache.hits == hits + 1
    saved, model.vision_cache = model.vision_cache, None
    try:
        assert warm == generate_text(model, processor, follow_up, GREEDY)  # the same request, computed cold
        with_other = [Message("user", "Compare: <image> and <image>", [photo, other])]
        cold_pair = generate_text(model, processor, with_other, GREEDY)
    finally:
        model.vision_cache = saved
    # Two images, one seen before (with the same tiling: two images keep tiling on): only the new one is encoded.
    model.vision_cache.clear()
    generate_text(model, processor, [Message("user", "<image>", [photo]), Message("assistant", "ok"),
                                     Message("user", "<image>", [other])], GREEDY)  # fmt: skip
    with counting_tower_calls(model) as tiles:
        assert generate_text(model, processor, with_other, GREEDY) == cold_pair
    assert tiles == []  # both were seen in the earlier two-image conversation


def test_the_app_header_shows_what_is_reused(loaded_fp32):
    from app.backends.local import LocalBackend
    from app.ui import header_markdown

    loaded = loaded_fp32["tiny"]
    loaded.model.vision_cache.clear()
    backend = LocalBackend(loaded)
    conversation = [Message("user", "What is this?", [_gradient_image(320, 240)])]
    generate_text(loaded.model, loaded.processor, conversation, GREEDY)
    generate_text(loaded.model, loaded.processor, conversation, GREEDY)
    header = header_markdown(backend)
    assert "vision features: 1 reused, 1 computed; 1 images" in header and "MiB held" in header
    assert "conversation prefixes:" in header and "tokens reused" in header


def test_click_to_ground_encodes_only_the_crop_of_an_image_already_asked_about(loaded_fp32):
    from app.backends.local import LocalBackend
    from app.click import crop_around, identify

    loaded = loaded_fp32["tiny"]
    loaded.model.vision_cache.clear()
    backend = LocalBackend(loaded)
    image = _gradient_image(640, 480)
    generate_text(loaded.model, loaded.processor, [Message("user", "What is this?", [image])], GREEDY)
    crop, _region = crop_around(image, 320, 240)
    crop_tiles = loaded.processor([Message("user", "x", [crop])])["images_spatial_crop"][0, 0].prod().item() + 1
    with counting_tower_calls(loaded.model) as tiles:
        identify(backend, image, 320, 240)
    assert sum(tiles) == crop_tiles  # the crop is new; the whole image's features were kept
