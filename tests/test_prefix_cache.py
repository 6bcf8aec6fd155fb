"""A conversation's key/value prefix is reused (model/prefix_cache.py): the next turn, a retry, two
images, a trimmed history and a cancelled answer all give the tokens a cold run gives."""

from __future__ import annotations

import threading

import pytest
import torch

from model.generation import GenerationSettings, generate_text, stream_reply
from model.prefix_cache import PrefixCache, crop
from model.processing import Message

from .test_model_forward import _gradient_image

GREEDY = GenerationSettings(temperature=0, max_new_tokens=10, min_new_tokens=10)


def cold(loaded, conversation, settings=GREEDY) -> str:
    """The same request with nothing reused."""
    model = loaded.model
    saved = model.prefix_cache, model.vision_cache
    model.prefix_cache = model.vision_cache = None
    try:
        return generate_text(model, loaded.processor, conversation, settings)
    finally:
        model.prefix_cache, model.vision_cache = saved


def prompt_length(loaded, conversation) -> int:
    return len(loaded.processor.encode_conversation(conversation)[0])


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_follow_ups_retries_and_trimmed_histories_answer_as_a_cold_run(loaded_fp32, variant):
    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    assert isinstance(model.prefix_cache, PrefixCache)  # installed by load_model
    model.prefix_cache.clear()
    first = [Message("user", "What is this?", [_gradient_image(640, 480)])]
    reply = generate_text(model, processor, first, GREEDY)
    assert reply == cold(loaded, first)
    # The next turn: the first prompt (image tokens included) is not computed again.
    follow_up = [*first, Message("assistant", reply), Message("user", "And its colour?")]
    stats = model.prefix_cache.stats()
    warm = generate_text(model, processor, follow_up, GREEDY)
    reused = model.prefix_cache.stats().reused_tokens - stats.reused_tokens
    assert reused >= prompt_length(loaded, first) - 1
    assert warm == cold(loaded, follow_up)
    # A retry of that turn reuses all but its last token.
    stats = model.prefix_cache.stats()
    assert generate_text(model, processor, follow_up, GREEDY) == warm
    assert model.prefix_cache.stats().reused_tokens - stats.reused_tokens == prompt_length(loaded, follow_up) - 1
    # A trimmed history starts differently: nothing is shared, and the answer is still the cold one.
    trimmed = [Message("user", "And its colour?")]
    stats = model.prefix_cache.stats()
    assert generate_text(model, processor, trimmed, GREEDY) == cold(loaded, trimmed)
    assert model.prefix_cache.stats().reused_tokens == stats.reused_tokens


def test_two_images_and_a_different_image_with_the_same_placeholders(loaded_fp32):
    loaded = loaded_fp32["tiny"]
    model, processor = loaded.model, loaded.processor
    model.prefix_cache.clear()
    pair = [Message("user", "Compare <image> and <image>.", [_gradient_image(200, 100), _gradient_image(100, 300)])]
    reply = generate_text(model, processor, pair, GREEDY)
    follow_up = [*pair, Message("assistant", reply), Message("user", "Which is taller?")]
    assert generate_text(model, processor, follow_up, GREEDY) == cold(loaded, follow_up)
    # Same words, same image sizes (so the same placeholder ids), different pixels: the second
    # image's tokens differ, so only what comes before them may be reused.
    other = [
        Message(
            "user", "Compare <image> and <image>.", [_gradient_image(200, 100), _gradient_image(100, 300).rotate(180)]
        )
    ]
    stats = model.prefix_cache.stats()
    assert generate_text(model, processor, other, GREEDY) == cold(loaded, other)
    ids, mask, _ = processor.encode_conversation(other)
    second_image_start = next(i for i in range(1, len(ids)) if mask[i] and not mask[i - 1] and any(mask[:i]))
    assert model.prefix_cache.stats().reused_tokens - stats.reused_tokens <= second_image_start


def test_a_cancelled_answer_leaves_no_corrupt_entry(loaded_fp32):
    loaded = loaded_fp32["small"]
    model, processor = loaded.model, loaded.processor
    model.prefix_cache.clear()
    first = [Message("user", "Describe it.", [_gradient_image(320, 240)])]
    cancel = threading.Event()
    stream = stream_reply(
        model, processor, first, GenerationSettings(temperature=0, max_new_tokens=200), cancel_event=cancel
    )
    pieces = iter(stream)
    next(pieces)  # the answer has started
    cancel.set()
    for _ in pieces:
        pass
    stream.join()
    partial = stream.text
    follow_up = [*first, Message("assistant", partial or "…"), Message("user", "Shorter, please.")]
    assert generate_text(model, processor, follow_up, GREEDY) == cold(loaded, follow_up)
    assert generate_text(model, processor, first, GREEDY) == cold(loaded, first)


def test_the_budget_holds_and_least_recently_used_entries_go(loaded_fp32):
    loaded = loaded_fp32["tiny"]
    model, processor = loaded.model, loaded.processor
    model.prefix_cache.clear()
    generate_text(model, processor, [Message("user", "One two three four five six seven eight nine ten.")], GREEDY)
    one = model.prefix_cache.stats().bytes_held
    assert one > 0
    saved = model.prefix_cache
    model.prefix_cache = PrefixCache(budget_bytes=int(one * 1.5))
    try:
        for word in ("apples", "pears", "plums"):
            generate_text(model, processor, [Message("user", f"Tell me about {word}, at length, please.")], GREEDY)
            stats = model.prefix_cache.stats()
            assert stats.entries == 1 and stats.bytes_held <= stats.budget_bytes
    finally:
        model.prefix_cache = saved


def test_crop_keeps_a_prefix_of_every_layer(loaded_fp32):
    model = loaded_fp32["tiny"].model
    cache = model.new_cache()
    embeds = torch.randn(1, 40, model.config.text_config.hidden_size)
    model.prefill_cache(embeds, torch.ones(1, 40, dtype=torch.long), None, cache)
    before = [layer.keys.clone() for layer in cache.layers]
    crop(cache, 25)
    assert cache.get_seq_length() == 25
    assert all(torch.equal(layer.keys, full[..., :25, :]) for layer, full in zip(cache.layers, before, strict=True))
