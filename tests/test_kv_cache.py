"""The in-place growing key/value cache behaves like transformers' DynamicLayer."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from model.kv_cache import DIM_MAJOR_SPARE_TOKENS, MIN_SPARE_TOKENS, GrowingLayer

from .test_model_forward import _left_padded_batch


def _steps(lengths, batch=2, heads=3, dim=8):
    torch.manual_seed(0)
    return [(torch.randn(batch, heads, n, dim), torch.randn(batch, heads, n, dim)) for n in lengths]


@pytest.mark.parametrize("values_dim_major", [False, True])
def test_updates_return_the_same_keys_and_values_as_concatenation(values_dim_major):
    growing, dynamic = GrowingLayer(values_dim_major), DynamicLayer()
    # A prompt, single steps, then enough steps to outgrow the first buffer.
    for keys, values in _steps([5, 1, 1, 3] + [1] * (MIN_SPARE_TOKENS + 10)):
        got, expected = growing.update(keys, values), dynamic.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert growing.get_seq_length() == dynamic.get_seq_length() == 10 + MIN_SPARE_TOKENS + 10
    assert (growing.values.stride(-1) == 1) != values_dim_major  # dimension-major: tokens are contiguous


def _room(values_dim_major: bool) -> int:
    """The spare tokens a buffer gets past a short prompt."""
    return DIM_MAJOR_SPARE_TOKENS if values_dim_major else MIN_SPARE_TOKENS


@pytest.mark.parametrize("values_dim_major", [False, True])
def test_steps_write_in_place_until_the_room_runs_out(values_dim_major):
    room = _room(values_dim_major)
    layer = GrowingLayer(values_dim_major)
    (prompt, prompt_values), *steps = _steps([4] + [1] * room)
    layer.update(prompt, prompt_values)
    buffer, value_buffer = layer._key_buffer, layer._value_buffer
    for keys, values in steps[: room - 1]:
        layer.update(keys, values)
        assert layer.keys.data_ptr() == buffer.data_ptr()  # no copy per step
        assert layer.values.data_ptr() == value_buffer.data_ptr()
        assert layer.get_seq_length() < buffer.shape[-2]  # a slot always stays free
    layer.update(*steps[-1])
    assert layer._key_buffer is not buffer and layer._key_buffer.shape[-2] > buffer.shape[-2]


@pytest.mark.parametrize("values_dim_major", [False, True])
def test_a_buffer_is_never_filled_exactly(values_dim_major):
    """Compiled decode graphs specialize on the cache's view being shorter than its buffer: a
    buffer filled exactly compiled them again, in the middle of an answer."""
    layer = GrowingLayer(values_dim_major)
    for keys, values in _steps([7] + [1] * (2 * _room(values_dim_major) + 3)):
        layer.update(keys, values)
        assert layer.get_seq_length() < layer._key_buffer.shape[-2]
        assert layer.get_seq_length() < layer._value_buffer.shape[-1 if values_dim_major else -2]


def test_dimension_major_values_keep_little_spare_room_after_a_long_prompt():
    """Their rows are read one after another by the decode attention; a quarter of spare room
    between rows made the CPU's prefetchers lose the stream at every row."""
    (keys, values), *_ = _steps([2000], batch=1)
    dim_major, token_major = GrowingLayer(True), GrowingLayer(False)
    dim_major.update(keys, values)
    token_major.update(keys, values)
    assert dim_major._value_buffer.shape[-1] - 2000 == DIM_MAJOR_SPARE_TOKENS
    assert token_major._value_buffer.shape[-2] - 2000 == 500  # a quarter: copies stay rare


@pytest.mark.parametrize("values_dim_major", [False, True])
def test_extend_hands_out_the_buffers_to_write_new_tokens_into(values_dim_major):
    """As the compiled decode step writes (model/cpu/decode.py): into the buffers, past the
    current length, after ``extend``; including past the first buffer's room."""
    growing, dynamic = GrowingLayer(values_dim_major), DynamicLayer()
    prompt, *steps = _steps([4] + [1] * (MIN_SPARE_TOKENS + 2))
    growing.update(*prompt)
    dynamic.update(*prompt)
    for keys, values in steps:
        length = growing.get_seq_length()
        key_buffer, value_buffer = growing.extend(1)
        key_buffer[..., length : length + 1, :] = keys
        if values_dim_major:
            value_buffer[..., length : length + 1] = values.transpose(-1, -2)
        else:
            value_buffer[..., length : length + 1, :] = values
        dynamic.update(keys, values)
    assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
    assert growing.keys.data_ptr() == growing._key_buffer.data_ptr()


@pytest.mark.parametrize("values_dim_major", [False, True])
def test_crop_beam_reordering_and_reset_keep_it_correct(values_dim_major):
    growing, dynamic = GrowingLayer(values_dim_major), DynamicLayer()
    first, second, third = _steps([6, 1, 1])
    for layer in (growing, dynamic):
        layer.update(*first)
        layer.crop(-2)  # drop two tokens: the next step overwrites them in the buffer
        layer.update(*second)
        layer.batch_select_indices(torch.tensor([1, 0]))  # a new tensor: the layer starts a new buffer
        layer.update(*third)
    assert torch.equal(growing.keys, dynamic.keys) and torch.equal(growing.values, dynamic.values)
    growing.reset()
    keys, values = growing.update(*second)
    assert torch.equal(keys, second[0]) and torch.equal(values, second[1])


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_generate_gives_the_same_tokens_with_either_cache(variant, loaded_fp32):
    from transformers import DynamicCache

    loaded = loaded_fp32[variant]
    model, processor = loaded.model, loaded.processor
    batch = _left_padded_batch(processor)
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "pad_token_id": processor.special.pad}
    growing = model.generate(**batch, **settings)  # the default: model.new_cache()
    dynamic = model.generate(**batch, **settings, cache=DynamicCache(config=model.language.config))
    assert torch.equal(growing, dynamic)
    cache = model.new_cache()
    assert all(isinstance(layer, GrowingLayer) for layer in cache.layers)
    assert len(cache.layers) == model.config.text_config.num_hidden_layers
    # Tiny's multi-head attention reads values dimension-major on the CPU; MLA caches latents as is.
    assert all(layer.values_dim_major == (variant == "tiny") for layer in cache.layers)
