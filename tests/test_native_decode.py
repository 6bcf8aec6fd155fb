"""The native whole-step CPU decoder (model/native_decode.py, model/csrc/tiny_decode.c): as accurate
as the stock decoder for the steps it covers, installed only where it builds and matches, and the
compiled step in its place elsewhere."""

from __future__ import annotations

import copy
import shutil
from collections import Counter

import pytest
import torch

from model import native_decode
from model.kv_cache import MIN_SPARE_TOKENS
from model.loading import load_model
from model.native_decode import NativeDecodeStep, native_supports, use_native_decode_step
from model.processing import Message
from model.testing import make_checkpoint

from .test_cpu_decode import _assert_as_accurate, _decode, _relative_error
from .test_model_forward import _gradient_image, _left_padded_batch

CAN_RUN = bool(torch.cpu._is_avx512_bf16_supported() and shutil.which("gcc"))


@pytest.fixture(scope="module")
def native(checkpoints):
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    if CAN_RUN:
        assert isinstance(loaded.model.language.decode_step, NativeDecodeStep), loaded.info.compute
        assert loaded.info.compute.endswith("decode: compiled one-row kernels; whole steps native")
    else:  # the compiled step takes over, and nothing pretends the native one ran
        assert loaded.info.compute.endswith("whole steps compiled"), loaded.info.compute
    return loaded


def _counted(step: NativeDecodeStep, monkeypatch) -> Counter:
    """Count the native library's step calls."""
    calls: Counter = Counter()
    library = step._library

    class Counting:
        def __getattr__(self, name):
            return getattr(library, name)

        def vl2_decode_step(self, *args):
            calls["native"] += 1
            return library.vl2_decode_step(*args)

    monkeypatch.setattr(step, "_library", Counting())
    return calls


def _compare_with_stock(loaded, monkeypatch, padded: bool, seed: int) -> None:
    """Prefill 9 tokens, decode 6 teacher-forced: the native steps' logits and cache are as close to
    an fp32 run as the stock bf16 decoder's."""
    language = loaded.model.language
    torch.manual_seed(seed)
    prompt, following = torch.randint(10, 500, (1, 9)), torch.randint(10, 500, (1, 6))
    mask = torch.ones(1, 9, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    caches = {name: loaded.model.new_cache() for name in ("native", "stock", "fp32")}
    calls = _counted(language.decode_step, monkeypatch)
    fast = _decode(language, caches["native"], prompt, mask, following)
    assert calls["native"] == 6  # every decode step was one native call
    monkeypatch.setattr(language, "decode_step", None)
    stock = _decode(language, caches["stock"], prompt, mask, following)
    exact = _decode(copy.deepcopy(language).float(), caches["fp32"], prompt, mask, following)
    assert fast.shape == stock.shape == (1, 6, language.config.vocab_size) and fast.dtype == torch.bfloat16
    _assert_as_accurate(fast, stock, exact)
    for native_layer, stock_layer, exact_layer in zip(*(c.layers for c in caches.values()), strict=True):
        _assert_as_accurate(native_layer.keys, stock_layer.keys, exact_layer.keys)
        _assert_as_accurate(native_layer.values, stock_layer.values, exact_layer.values)


@pytest.mark.parametrize("padded", [False, True])
def test_native_steps_are_as_accurate_as_the_stock_decoder(native, padded, monkeypatch):
    if not CAN_RUN:
        assert "AVX512-BF16" in (native_supports(native.model.language) or "") or not shutil.which("gcc")
        return
    _compare_with_stock(native, monkeypatch, padded, seed=1)


def test_native_steps_at_widths_that_use_every_loop(tmp_path, monkeypatch):
    """The test checkpoint's widths (64) only reach the kernels' tails. Wider ones run the 256-wide
    product loop and its tail (320 = 256 + 64; the dense MLP's 288 = 256 + 32), a tail of 16
    inside a 32-wide block (an expert width of 48), and head_dim 64."""
    if not CAN_RUN:
        return
    sizes = {"hidden_size": 320, "intermediate_size": 288, "moe_intermediate_size": 48, "num_attention_heads": 5,
             "num_key_value_heads": 5}  # fmt: skip
    path = make_checkpoint(tmp_path / "wide", "tiny", seed=5, language_overrides=sizes)
    loaded = load_model(path, device="cpu", dtype="bf16")
    assert isinstance(loaded.model.language.decode_step, NativeDecodeStep), loaded.info.compute
    _compare_with_stock(loaded, monkeypatch, padded=False, seed=4)


def test_generate_answers_an_image_question_with_native_steps(native, checkpoints, monkeypatch):
    if not CAN_RUN:
        return
    monkeypatch.setenv("VL2_CPU_KERNELS", "eager")
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    assert reference.model.language.decode_step is None
    calls = _counted(native.model.language.decode_step, monkeypatch)
    inputs = native.processor([Message("user", "<image>\n<|ref|>the object<|/ref|>.", [_gradient_image(300, 200)])])
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "output_logits": True,
                "return_dict_in_generate": True}  # fmt: skip
    runs = {}
    for name, loaded in (("native", native), ("eager", reference)):
        embeds = loaded.model.prepare_inputs_embeds(
            inputs["input_ids"], inputs["pixel_values"], inputs["images_seq_mask"], inputs["images_spatial_crop"]
        )
        with torch.inference_mode():
            runs[name] = loaded.model.language.generate(
                inputs_embeds=embeds, attention_mask=inputs["attention_mask"], cache=loaded.model.new_cache(),
                **settings,
            )  # fmt: skip
    assert calls["native"] == 7  # the first of the 8 tokens comes from the prompt
    # The first decoded step's logits, before a near-tie of random bf16 weights could flip a token.
    assert _relative_error(runs["native"].logits[1], runs["eager"].logits[1]) < 2e-2


def test_native_steps_follow_a_cache_regrowth_and_a_crop(native):
    """Past the first buffer's spare room the cache moves to a larger buffer (the step then writes
    through new pointers), and a crop makes the next steps overwrite positions."""
    if not CAN_RUN:
        return
    language = native.model.language
    torch.manual_seed(2)
    prompt, following = torch.randint(10, 500, (1, 5)), torch.randint(10, 500, (1, MIN_SPARE_TOKENS + 8))
    logits, caches = {}, {}
    for name, decoder in (("native", language.decode_step), ("stock", None)):
        saved, language.decode_step = language.decode_step, decoder
        try:
            cache = native.model.new_cache()
            with torch.inference_mode():
                language(input_ids=prompt, cache=cache, use_cache=True)
                first_buffer = cache.layers[0]._key_buffer
                for position in range(following.shape[1]):
                    out = language(input_ids=following[:, position : position + 1], cache=cache, use_cache=True)
                    if position == 20:
                        cache.crop(-3)
            assert cache.layers[0]._key_buffer is not first_buffer
        finally:
            language.decode_step = saved
        logits[name], caches[name] = out.logits, cache
    assert _relative_error(logits["native"], logits["stock"]) < 2e-2
    for native_layer, stock_layer in zip(caches["native"].layers, caches["stock"].layers, strict=True):
        assert native_layer.get_seq_length() == stock_layer.get_seq_length() == 5 + MIN_SPARE_TOKENS + 8 - 3
        assert _relative_error(native_layer.keys, stock_layer.keys) < 2e-2
        assert _relative_error(native_layer.values, stock_layer.values) < 2e-2


def test_steps_it_does_not_cover_go_through_the_stock_decoder(native, monkeypatch):
    if not CAN_RUN:
        return
    language = native.model.language
    calls = _counted(language.decode_step, monkeypatch)
    batch = _left_padded_batch(native.processor)  # two sequences
    embeds = native.model.prepare_inputs_embeds(
        batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"], batch["images_spatial_crop"]
    )
    with torch.inference_mode():
        language.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=3, do_sample=False
        )
        out = language(input_ids=torch.tensor([[5, 6]]), cache=native.model.new_cache(), use_cache=True)
        language(input_ids=torch.tensor([[7]]), cache=out.cache, use_cache=True, output_hidden_states=True)
    with torch.no_grad():
        out = language(input_ids=torch.tensor([[5, 6]]), cache=native.model.new_cache(), use_cache=True)
        language(input_ids=torch.tensor([[8]]), cache=out.cache, use_cache=True)
    assert calls["native"] == 0


def test_a_failing_build_or_check_leaves_the_compiled_step(native, tmp_path, monkeypatch):
    """No compiler (or one that fails), or logits that do not match the stock decoder's: the model
    keeps the compiled step and its compute summary says why."""
    language = native.model.language
    installed = language.decode_step
    try:
        monkeypatch.setattr(native_decode, "_libraries", {})
        monkeypatch.setenv("VL2_NATIVE_CACHE", str(tmp_path))  # nothing built there yet
        monkeypatch.setenv("CC", "false")
        if CAN_RUN:
            line = use_native_decode_step(language)
            assert line == "native step failed (RuntimeError: false exited with status 1)"
            assert language.decode_step is None
            monkeypatch.setenv("VL2_DECODE_STEP", "native")  # asked for explicitly: the failure is raised
            with pytest.raises(RuntimeError, match="false exited with status 1"):
                use_native_decode_step(language)
        monkeypatch.undo()
        if CAN_RUN:  # logits twice what they should be
            monkeypatch.setattr(NativeDecodeStep, "__call__", _doubling(NativeDecodeStep.__call__))
            line = use_native_decode_step(language)
            assert line.startswith("native step failed (AssertionError: logits differ")
            assert language.decode_step is None
    finally:
        language.decode_step = installed


def _doubling(call):
    def doubled(self, *args):
        out = call(self, *args)
        out.logits.mul_(2)
        return out

    return doubled


def test_the_library_is_built_once_per_source_and_compiler(tmp_path, monkeypatch):
    if not shutil.which("gcc"):
        return
    monkeypatch.setenv("VL2_NATIVE_CACHE", str(tmp_path))
    first = native_decode.build_library()
    built_at = first.stat().st_mtime_ns
    assert native_decode.build_library() == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no scratch files left behind


def test_models_it_does_not_cover_say_why(checkpoints, loaded_fp32, monkeypatch):
    fp32 = loaded_fp32["tiny"].model.language
    assert "whole steps native" not in loaded_fp32["tiny"].info.compute
    if CAN_RUN:
        assert native_supports(fp32) == "not all linear weights are bf16 (4-bit, 8-bit or fp32)"
    small = loaded_fp32["small"].model.language
    assert native_supports(small) == "not a Tiny-style language model"
    monkeypatch.setenv("VL2_DECODE_STEP", "native")
    with pytest.raises(RuntimeError, match="the native step cannot run this model"):
        use_native_decode_step(small)
    monkeypatch.setenv("VL2_DECODE_STEP", "fastest")
    with pytest.raises(ValueError, match="use auto, native or compiled"):
        use_native_decode_step(fp32)


def test_a_deep_copy_of_the_model_decodes_with_the_stock_decoder(native):
    """The native step points into its model's weights: a copy (made to compare in fp32, say) must
    not run on the original's weights."""
    if not CAN_RUN:
        return
    copied = copy.deepcopy(native.model.language)
    assert copied.decode_step is None and isinstance(native.model.language.decode_step, NativeDecodeStep)
