"""Streaming, sampling settings and cancellation on a generated small checkpoint."""

from __future__ import annotations

import threading

import pytest
import torch

from model.generation import CancelOnEvent, GenerationSettings, generate_text, stream_reply
from model.processing import Message

from .test_model_forward import _gradient_image


def test_official_demo_defaults():
    settings = GenerationSettings()
    kwargs = settings.generate_kwargs()
    assert kwargs["do_sample"] is True
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["repetition_penalty"]) == (0.1, 0.9, 1.1)
    greedy = GenerationSettings(temperature=0).generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None


def test_stream_yields_the_same_text_as_a_blocking_call(loaded_fp32):
    loaded = loaded_fp32["tiny"]
    conversation = [Message("user", "What is in the picture?", [_gradient_image(256, 192)])]
    settings = GenerationSettings(temperature=0, max_new_tokens=12, min_new_tokens=12)
    stream = stream_reply(loaded.model, loaded.processor, conversation, settings)
    pieces = list(stream)
    assert pieces, "no text streamed"
    assert "".join(pieces) == stream.text
    assert stream.text == generate_text(loaded.model, loaded.processor, conversation, settings)
    assert not stream.running


def test_multi_turn_conversation_with_two_images(loaded_fp32):
    loaded = loaded_fp32["small"]
    conversation = [
        Message("user", "This is image_1: <image>\nThis is image_2: <image>\nCompare them.",
                [_gradient_image(200, 100), _gradient_image(100, 300)]),
        Message("assistant", "They differ."),
        Message("user", "How?"),
    ]  # fmt: skip
    text = generate_text(loaded.model, loaded.processor, conversation, GenerationSettings(max_new_tokens=6, seed=1))
    assert isinstance(text, str)


def test_sampling_with_a_seed_is_reproducible(loaded_fp32):
    loaded = loaded_fp32["base"]
    conversation = [Message("user", "Say something.")]
    settings = GenerationSettings(temperature=0.7, max_new_tokens=8, min_new_tokens=8, seed=123)
    first = generate_text(loaded.model, loaded.processor, conversation, settings)
    second = generate_text(loaded.model, loaded.processor, conversation, settings)
    assert first == second


def test_cancel_ends_the_generate_thread_within_one_step(loaded_fp32):
    loaded = loaded_fp32["tiny"]
    conversation = [Message("user", "Talk for a long time.")]
    settings = GenerationSettings(temperature=0, max_new_tokens=400, min_new_tokens=400)
    stream = stream_reply(loaded.model, loaded.processor, conversation, settings)
    iterator = iter(stream)
    next(iterator)  # generation is running and producing text
    stream.cancel()
    rest = list(iterator)  # ends because generation ended, not because we stopped reading
    stream.join()
    assert not stream.running
    assert stream.steps_at_cancel is not None
    assert stream.criteria.steps - stream.steps_at_cancel <= 1
    assert stream.criteria.steps < 400
    assert isinstance(rest, list)


def test_cancel_criteria_flags_every_row():
    event = threading.Event()
    criteria = CancelOnEvent(event)
    ids = torch.zeros((3, 5), dtype=torch.long)
    assert not criteria(ids, None).any()
    event.set()
    assert criteria(ids, None).all() and criteria.steps == 2


def test_errors_in_the_generate_thread_reach_the_consumer(loaded_fp32, monkeypatch):
    loaded = loaded_fp32["tiny"]

    def broken_generate(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loaded.model, "generate", broken_generate)
    stream = stream_reply(loaded.model, loaded.processor, [Message("user", "hi")], GenerationSettings())
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        list(stream)
