"""Batched generation that shares prompt starts (model/batching.py), and how many rows fit."""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from model.batching import auto_batch_size, generate_batch, shared_prefix_inputs
from model.generation import GenerationSettings
from model.kv_cache import kv_cache_bytes
from model.processing import Message

GREEDY = GenerationSettings(max_new_tokens=10, min_new_tokens=10, temperature=0.0, repetition_penalty=1.0)


def finds(image: Image.Image, phrases: list[str]) -> list[list[Message]]:
    return [[Message("user", f"<|ref|>{phrase}<|/ref|>.", [image])] for phrase in phrases]


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_rows_sharing_an_image_start_from_one_prefill_and_equal_single_runs(variant, loaded_fp32):
    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    wide, tall = Image.new("RGB", (300, 120), "red"), Image.new("RGB", (90, 200), "blue")
    conversations = finds(wide, ["a", "the long red thing on the left"]) + finds(tall, ["sky", "x"])
    encoded = [processor.encode_conversation(c) for c in conversations]
    shared = shared_prefix_inputs(model, processor, encoded)
    assert shared is not None
    # Two distinct starts were prefilled (all but their last token), then repeated for each question.
    assert shared["cache"].layers[0].keys.shape[0] == 4
    # The cache holds the images and the text before the phrases, not the questions' own endings.
    image_tokens = sum(encoded[0][1])
    assert image_tokens < shared["cache"].get_seq_length() < min(len(ids) for ids, _, _ in encoded) - 1
    settings = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": processor.special.pad}
    together = model.generate(**shared, **settings)
    for row, conversation in enumerate(conversations):
        alone = model.generate(**processor(conversation), **settings)[0]
        assert torch.equal(together[row], alone), row
    texts = generate_batch(model, processor, conversations, GREEDY)
    assert texts == [generate_batch(model, processor, [c], GREEDY)[0] for c in conversations]


def test_nothing_shared_means_a_plain_batch(loaded_fp32):
    processor = loaded_fp32["tiny"].processor
    encoded = [processor.encode_conversation(c) for c in finds(Image.new("RGB", (64, 64)), ["a"])]
    encoded += [processor.encode_conversation(c) for c in finds(Image.new("RGB", (64, 64)), ["a"])]
    assert shared_prefix_inputs(loaded_fp32["tiny"].model, processor, encoded) is None


def test_a_cancelled_batch_returns_at_once(loaded_fp32):
    loaded = loaded_fp32["tiny"]
    event = threading.Event()
    event.set()
    replies = generate_batch(loaded.model, loaded.processor, finds(Image.new("RGB", (64, 64)), ["a", "b"]), GREEDY,
                             cancel_event=event)  # fmt: skip
    assert replies == ["", ""]


def test_batch_size_follows_free_memory(loaded_fp32):
    model = loaded_fp32["tiny"].model
    row = kv_cache_bytes(model.config.text_config, 1500, 4)  # a row's cache in fp32
    small = auto_batch_size(model, 1000, 500, free_bytes=1)
    roomy = auto_batch_size(model, 1000, 500, free_bytes=10**12)
    middle = auto_batch_size(model, 1000, 500, free_bytes=row * 2 * 5)
    assert small == 1 and roomy == 16 and 1 <= middle < 5
