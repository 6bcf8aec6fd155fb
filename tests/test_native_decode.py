"""The native whole-step CPU decoder (model/cpu/native.py, model/cpu/csrc/tiny_decode.c): as accurate
as the stock decoder for the steps it covers, installed only where it builds and matches, and the
compiled step in its place elsewhere."""

from __future__ import annotations

import copy
import shutil
from collections import Counter

import pytest
import torch

from model.cpu import native as native_decode
from model.cpu.decode import TinyDecodeStep
from model.cpu.native import NativeDecodeStep, native_supports, use_native_decode_step
from model.kv_cache import DIM_MAJOR_SPARE_TOKENS
from model.loading import load_model
from model.testing import make_checkpoint

from .test_cpu_decode import (
    _decode,
    _relative_error,
    check_a_cache_regrowth_and_a_crop,
    generate_image_answers,
    run_steps_whole_steps_do_not_cover,
)

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


def _assert_as_accurate(fast: torch.Tensor, stock: torch.Tensor, exact: torch.Tensor, slack: float) -> None:
    """``fast`` as close to the fp32 run as the stock bf16 decoder, within ``slack``: both round
    where transformers rounds, and differ in the order of their fp32 sums."""
    fast_error, stock_error = _relative_error(fast, exact), _relative_error(stock, exact)
    assert fast_error < slack * stock_error + 1e-3, f"native steps {fast_error:.2e}, stock {stock_error:.2e}"


def _decode_native(loaded, monkeypatch, seed: int, prompt_tokens: int, padded: bool):
    """Prefill a prompt of random tokens, then decode 6 teacher-forced: the logits (each step one
    native call) and the cache."""
    torch.manual_seed(seed)
    prompt, following = torch.randint(10, 500, (1, prompt_tokens)), torch.randint(10, 500, (1, 6))
    mask = torch.ones(1, prompt_tokens, dtype=torch.long)
    if padded:
        mask[0, :2] = 0
    cache = loaded.model.new_cache()
    with monkeypatch.context() as patch:
        calls = _counted(loaded.model.language.decode_step, patch)
        logits = _decode(loaded.model.language, cache, prompt, mask, following)
    assert calls["native"] == 6
    return (prompt, mask, following), logits, cache


def _compare_with_stock(loaded, monkeypatch, padded: bool, seed: int, prompt_tokens: int = 9, slack=1.25) -> None:
    """The native steps' logits and cache are as close to an fp32 run as the stock bf16 decoder's."""
    language = loaded.model.language
    inputs, fast, native_cache = _decode_native(loaded, monkeypatch, seed, prompt_tokens, padded)
    caches = {"native": native_cache, "stock": loaded.model.new_cache(), "fp32": loaded.model.new_cache()}
    monkeypatch.setattr(language, "decode_step", None)
    stock = _decode(language, caches["stock"], *inputs)
    exact = _decode(copy.deepcopy(language).float(), caches["fp32"], *inputs)
    assert fast.shape == stock.shape == (1, 6, language.config.vocab_size) and fast.dtype == torch.bfloat16
    _assert_as_accurate(fast, stock, exact, slack)
    for native_layer, stock_layer, exact_layer in zip(*(c.layers for c in caches.values()), strict=True):
        _assert_as_accurate(native_layer.keys, stock_layer.keys, exact_layer.keys, slack)
        _assert_as_accurate(native_layer.values, stock_layer.values, exact_layer.values, slack)


@pytest.mark.parametrize("padded", [False, True])
def test_native_steps_are_as_accurate_as_the_stock_decoder(native, padded, monkeypatch):
    if not CAN_RUN:
        assert "AVX512-BF16" in (native_supports(native.model.language) or "") or not shutil.which("gcc")
        return
    _compare_with_stock(native, monkeypatch, padded, seed=1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The test checkpoint's widths (64) only reach the kernels' tails. Wider ones run the 256-wide
    product loop and its tail (320 = 256 + 64; the dense MLP's 288 = 256 + 32), a tail of 16
    inside a 32-wide block (an expert width of 48), and head_dim 64 over 5 heads."""
    sizes = {"hidden_size": 320, "intermediate_size": 288, "moe_intermediate_size": 48, "num_attention_heads": 5,
             "num_key_value_heads": 5}  # fmt: skip
    path = make_checkpoint(tmp_path_factory.mktemp("wide"), "tiny", seed=5, language_overrides=sizes)
    return load_model(path, device="cpu", dtype="bf16")


def test_native_steps_at_widths_that_use_every_loop(wide, monkeypatch):
    """Also a 70-token prompt: attention's 32-wide loops and a softmax over several blocks. (The
    stock reference moves with the state of Inductor's caches, eager or compiled kernels: measured
    1.25-1.65e-2 from the fp32 run, the native steps 1.67-1.72e-2, hence the slack.)"""
    if not CAN_RUN:
        return
    assert isinstance(wide.model.language.decode_step, NativeDecodeStep), wide.info.compute
    _compare_with_stock(wide, monkeypatch, padded=True, seed=4, prompt_tokens=70, slack=1.5)


@pytest.mark.parametrize("threads", [1, 3, 7])  # 7: more threads than heads, some with no rows
def test_native_steps_do_not_depend_on_the_thread_count(wide, threads, monkeypatch):
    """Each row and head is computed the same way whichever thread owns it: the same bits."""
    if not CAN_RUN:
        return
    _, expected, expected_cache = _decode_native(wide, monkeypatch, seed=6, prompt_tokens=70, padded=True)
    step_alone = NativeDecodeStep.__call__

    def with_threads(self, *args):  # only the native steps: the prompt is prefilled as before
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return step_alone(self, *args)
        finally:
            torch.set_num_threads(saved)

    monkeypatch.setattr(NativeDecodeStep, "__call__", with_threads)
    _, got, cache = _decode_native(wide, monkeypatch, seed=6, prompt_tokens=70, padded=True)
    assert torch.equal(got, expected)
    for layer, expected_layer in zip(cache.layers, expected_cache.layers, strict=True):
        assert torch.equal(layer.keys, expected_layer.keys) and torch.equal(layer.values, expected_layer.values)


def test_generate_answers_an_image_question_with_native_steps(native, checkpoints, monkeypatch):
    if not CAN_RUN:
        return
    monkeypatch.setenv("VL2_CPU_KERNELS", "eager")
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    assert reference.model.language.decode_step is None
    calls = _counted(native.model.language.decode_step, monkeypatch)
    runs = generate_image_answers({"native": native, "eager": reference})
    assert calls["native"] == 7  # the first of the 8 tokens comes from the prompt
    # The first decoded step's logits, before a near-tie of random bf16 weights could flip a token.
    assert _relative_error(runs["native"].logits[1], runs["eager"].logits[1]) < 2e-2


def test_native_steps_follow_a_cache_regrowth_and_a_crop(native):
    """Past the first buffer's spare room the cache moves to a larger buffer (the step then writes
    through new pointers), and a crop makes the next steps overwrite positions."""
    if not CAN_RUN:
        return
    check_a_cache_regrowth_and_a_crop(native, "native", DIM_MAJOR_SPARE_TOKENS + 8, 2e-2)


def test_steps_it_does_not_cover_go_through_the_stock_decoder(native, monkeypatch):
    if not CAN_RUN:
        return
    calls = _counted(native.model.language.decode_step, monkeypatch)
    run_steps_whole_steps_do_not_cover(native)
    assert calls["native"] == 0


def test_a_failing_build_or_check_leaves_the_compiled_step(checkpoints, native, tmp_path, monkeypatch):
    """No compiler (or one that fails), or logits that do not match the stock decoder's: the model
    gets the compiled step and its compute summary says why."""
    if not CAN_RUN:
        return
    monkeypatch.setattr(native_decode, "_libraries", {})
    monkeypatch.setenv("VL2_NATIVE_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "false")
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    assert loaded.info.compute.endswith(
        "native step failed (RuntimeError: false exited with status 1); whole steps compiled"
    )
    assert isinstance(loaded.model.language.decode_step, TinyDecodeStep)
    monkeypatch.setenv("VL2_DECODE_STEP", "native")  # asked for explicitly: the failure is raised
    with pytest.raises(RuntimeError, match="false exited with status 1"):
        use_native_decode_step(loaded.model.language)
    monkeypatch.undo()

    language = native.model.language
    installed = language.decode_step
    monkeypatch.setattr(NativeDecodeStep, "__call__", _doubling(NativeDecodeStep.__call__))  # logits doubled
    try:
        line = use_native_decode_step(language)
        assert line.startswith("native step failed (AssertionError: logits differ") and language.decode_step is None
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


def test_weights_replaced_after_load_send_steps_to_the_stock_decoder(checkpoints, monkeypatch):
    """``.float()`` after load gives the model new weights: the step, which points into the old
    ones, stands aside."""
    if not CAN_RUN:
        return
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    language = loaded.model.language
    calls = _counted(language.decode_step, monkeypatch)
    language.float()
    with torch.inference_mode():
        out = language(input_ids=torch.tensor([[5, 6]]), cache=loaded.model.new_cache(), use_cache=True)
        step = language(input_ids=torch.tensor([[7]]), cache=out.cache, use_cache=True)
    assert calls["native"] == 0 and step.logits.dtype == torch.float32
