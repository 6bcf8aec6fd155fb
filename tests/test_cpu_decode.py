"""The compiled whole-step CPU decoder (model/cpu/decode.py): the stock decoder's results, used
exactly for the steps it covers, and never installed when it would not match."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch
from transformers import DynamicCache

from model.cpu import decode as cpu_decode
from model.cpu.decode import supports, use_decode_step
from model.kv_cache import DIM_MAJOR_SPARE_TOKENS, MIN_SPARE_TOKENS
from model.loading import load_model
from model.processing import Message

from .test_cpu_kernels import _counting
from .test_model_forward import _gradient_image, _left_padded_batch


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def _assert_as_accurate(fast: torch.Tensor, stock: torch.Tensor, exact: torch.Tensor) -> None:
    """In fp32 the whole steps equal the stock decoder; in bf16 (where the stages round where the
    stock decoder does but fuse the arithmetic in between) they are as close to an fp32 run."""
    if stock.dtype == torch.float32:
        assert _relative_error(fast, stock) < 1e-5
        return
    fast_error, stock_error = _relative_error(fast, exact), _relative_error(stock, exact)
    assert fast_error < 1.25 * stock_error + 1e-3, f"whole steps {fast_error:.2e}, stock {stock_error:.2e}"


def _count_calls(language, monkeypatch) -> Counter:
    counting, calls = _counting(language.decode_step.graphs)
    monkeypatch.setattr(language.decode_step, "graphs", counting)
    return calls


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def tiny(request, checkpoints):
    # The compiled step even where the native one would run bf16 (tests/test_native_decode.py).
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VL2_DECODE_STEP", "compiled")
        loaded = load_model(checkpoints["tiny"], device="cpu", dtype=request.param)
    assert loaded.model.language.decode_step is not None, loaded.info.compute
    assert loaded.info.compute.endswith("decode: compiled one-row kernels; whole steps compiled")
    return loaded


def _decode(language, cache, prompt: torch.Tensor, mask: torch.Tensor, following: torch.Tensor):
    """Prefill ``prompt`` then decode ``following`` teacher-forced; the logits of each step."""
    with torch.inference_mode():
        language(input_ids=prompt, attention_mask=mask, cache=cache, use_cache=True)
        logits = []
        for position in range(following.shape[1]):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
            token = following[:, position : position + 1]
            logits.append(language(input_ids=token, attention_mask=mask, cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("padded", [False, True])
def test_whole_steps_give_the_stock_decoders_logits_and_cache(tiny, padded, monkeypatch):
    language = tiny.model.language
    torch.manual_seed(1)
    prompt, following = torch.randint(10, 500, (1, 9)), torch.randint(10, 500, (1, 6))
    mask = torch.ones(1, 9, dtype=torch.long)
    if padded:  # a single sequence may still carry padding: its first two tokens masked out
        mask[0, :2] = 0
    caches = {name: tiny.model.new_cache() for name in ("whole steps", "stock", "fp32")}
    calls = _count_calls(language, monkeypatch)
    fast = _decode(language, caches["whole steps"], prompt, mask, following)
    monkeypatch.setattr(language, "decode_step", None)
    stock = _decode(language, caches["stock"], prompt, mask, following)
    exact = _decode(copy.deepcopy(language).float(), caches["fp32"], prompt, mask, following)

    assert fast.shape == stock.shape == (1, 6, language.config.vocab_size) and fast.dtype == stock.dtype
    _assert_as_accurate(fast, stock, exact)
    for fast_layer, stock_layer, exact_layer in zip(*(c.layers for c in caches.values()), strict=True):
        _assert_as_accurate(fast_layer.keys, stock_layer.keys, exact_layer.keys)
        _assert_as_accurate(fast_layer.values, stock_layer.values, exact_layer.values)
    kinds = ["moe" if getattr(layer.mlp, "experts", None) is not None else "dense" for layer in language.model.layers]
    assert set(kinds) == {"moe", "dense"}  # both kinds of layer were exercised
    # One call per layer boundary: the first attention, each layer's MLP with the next layer's
    # attention, and the last MLP with the logits.
    expected = Counter({"first_stage": 6, f"{kinds[-1]}_logits": 6})
    for kind in kinds[:-1]:
        expected[f"{kind}_stage"] += 6
    assert calls == expected


def generate_image_answers(models: dict) -> dict:
    """Each loaded model's 8 greedy tokens (and their logits) for one grounding question about an
    image, through ``generate``."""
    first = next(iter(models.values()))
    inputs = first.processor([Message("user", "<image>\n<|ref|>the object<|/ref|>.", [_gradient_image(300, 200)])])
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False, "output_logits": True,
                "return_dict_in_generate": True}  # fmt: skip
    runs = {}
    for name, loaded in models.items():
        embeds = loaded.model.prepare_inputs_embeds(
            inputs["input_ids"], inputs["pixel_values"], inputs["images_seq_mask"], inputs["images_spatial_crop"]
        )
        with torch.inference_mode():
            runs[name] = loaded.model.language.generate(
                inputs_embeds=embeds,
                attention_mask=inputs["attention_mask"],
                cache=loaded.model.new_cache(),
                **settings,
            )
    return runs


def test_generate_decodes_a_single_image_question_with_whole_steps(tiny, checkpoints, monkeypatch):
    monkeypatch.setenv("VL2_CPU_KERNELS", "eager")
    dtype = "fp32" if tiny.model.language.lm_head.weight.dtype == torch.float32 else "bf16"
    reference = load_model(checkpoints["tiny"], device="cpu", dtype=dtype)
    assert reference.model.language.decode_step is None
    calls = _count_calls(tiny.model.language, monkeypatch)
    compiled_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = generate_image_answers({"whole steps": tiny, "eager": reference})
    assert calls["first_stage"] == 7  # the first of the 8 tokens comes from the prompt
    # Everything was compiled at load: nothing in the middle of an answer.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_graphs
    fast, eager = runs["whole steps"], runs["eager"]
    if dtype == "fp32":  # bf16 random weights have near-ties that rounding may flip
        assert torch.equal(fast.sequences, eager.sequences)
        assert max(_relative_error(f, e) for f, e in zip(fast.logits, eager.logits, strict=True)) < 1e-5
    else:  # the first decoded step's logits, before any near-tie could flip a token
        assert _relative_error(fast.logits[1], eager.logits[1]) < 2e-2


def check_a_cache_regrowth_and_a_crop(loaded, name: str, following_tokens: int, tolerance: float) -> None:
    """Decode ``following_tokens`` after a 5-token prompt, cropping 3 tokens after the 21st, with
    the installed whole-step decoder and with the stock one: past the first buffer's spare room the
    cache moves to a larger buffer, and the crop makes the next steps rewrite positions. Logits,
    keys and values agree within ``tolerance``."""
    language = loaded.model.language
    torch.manual_seed(2)
    prompt, following = torch.randint(10, 500, (1, 5)), torch.randint(10, 500, (1, following_tokens))
    logits, caches = {}, {}
    for decoder_name, decoder in ((name, language.decode_step), ("stock", None)):
        saved, language.decode_step = language.decode_step, decoder
        try:
            cache = loaded.model.new_cache()
            with torch.inference_mode():
                language(input_ids=prompt, cache=cache, use_cache=True)
                first_buffer = cache.layers[0]._key_buffer
                for position in range(following.shape[1]):
                    out = language(input_ids=following[:, position : position + 1], cache=cache, use_cache=True)
                    if position == 20:
                        cache.crop(-3)  # the next steps rewrite three positions
            assert cache.layers[0]._key_buffer is not first_buffer  # it outgrew the first buffer
        finally:
            language.decode_step = saved
        logits[decoder_name], caches[decoder_name] = out.logits, cache
    assert _relative_error(logits[name], logits["stock"]) < tolerance
    for fast_layer, stock_layer in zip(caches[name].layers, caches["stock"].layers, strict=True):
        assert fast_layer.get_seq_length() == stock_layer.get_seq_length() == 5 + following_tokens - 3
        assert _relative_error(fast_layer.keys, stock_layer.keys) < tolerance
        assert _relative_error(fast_layer.values, stock_layer.values) < tolerance


def test_whole_steps_match_across_a_cache_regrowth_and_a_crop(tiny):
    """The graphs write and read the right positions through a regrowth and a crop."""
    tolerance = 1e-5 if tiny.model.language.lm_head.weight.dtype == torch.float32 else 2e-2
    check_a_cache_regrowth_and_a_crop(tiny, "whole steps", MIN_SPARE_TOKENS + 8, tolerance)


def test_long_answers_compile_nothing_after_load(tiny, monkeypatch):
    """Inductor tells cache lengths apart past 4,096 (heads x tokens, and tokens alone); the
    warm-up compiled both sides of each, so no answer pauses to compile (nothing stops an answer
    at the model's context length)."""
    language = tiny.model.language
    calls = _count_calls(language, monkeypatch)
    split = cpu_decode.REDUCTION_SPLIT
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for length in (7, split // language.config.num_attention_heads + 3, split + 3):
            prompt = torch.randint(10, 500, (1, length))
            out = language(input_ids=prompt, cache=tiny.model.new_cache(), use_cache=True)
            language(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
        # An answer that outgrows its cache's buffer twice, each time using up its last slot.
        cache = tiny.model.new_cache()
        out = language(input_ids=torch.randint(10, 500, (1, 5)), cache=cache, use_cache=True)
        for _ in range(2 * DIM_MAJOR_SPARE_TOKENS + 3):
            out = language(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)
    assert calls["first_stage"] == 3 + 2 * DIM_MAJOR_SPARE_TOKENS + 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled


def run_steps_whole_steps_do_not_cover(loaded) -> None:
    """Decode steps no whole-step decoder covers: two sequences, hidden states asked for, a cache
    it cannot write into, and a step outside ``inference_mode``."""
    language = loaded.model.language
    batch = _left_padded_batch(loaded.processor)  # two sequences
    embeds = loaded.model.prepare_inputs_embeds(
        batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"], batch["images_spatial_crop"]
    )
    with torch.inference_mode():
        language.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], max_new_tokens=3, do_sample=False
        )
        out = language(input_ids=torch.tensor([[5, 6]]), cache=loaded.model.new_cache(), use_cache=True)
        language(input_ids=torch.tensor([[7]]), cache=out.cache, use_cache=True, output_hidden_states=True)
        # A cache the step cannot write into: transformers' own, appended to by ``torch.cat``.
        out = language(input_ids=torch.tensor([[5, 6]]), cache=DynamicCache(config=language.config), use_cache=True)
        language(input_ids=torch.tensor([[7]]), cache=out.cache, use_cache=True)
    with torch.no_grad():  # outside inference_mode (training code, gradients): the stock path
        out = language(input_ids=torch.tensor([[5, 6]]), cache=loaded.model.new_cache(), use_cache=True)
        language(input_ids=torch.tensor([[8]]), cache=out.cache, use_cache=True)


def test_steps_it_does_not_cover_go_through_the_stock_decoder(tiny, monkeypatch):
    calls = _count_calls(tiny.model.language, monkeypatch)
    run_steps_whole_steps_do_not_cover(tiny)
    assert sum(calls.values()) == 0


def test_a_mismatch_at_load_keeps_the_stock_decoder(tiny, monkeypatch):
    language = tiny.model.language
    installed = language.decode_step
    graphs = cpu_decode.step_graphs()

    def doubled(stage):  # logits twice what they should be
        return lambda *args: (2 * stage(*args)[0], None)

    wrong = dataclasses.replace(
        graphs, dense_logits=doubled(graphs.dense_logits), moe_logits=doubled(graphs.moe_logits)
    )
    monkeypatch.setattr(cpu_decode, "step_graphs", lambda: wrong)
    try:
        reason = use_decode_step(language)
        assert reason is not None and reason.startswith("whole steps failed (AssertionError")
        assert language.decode_step is None
    finally:
        language.decode_step = installed


def test_models_it_does_not_cover_keep_the_stock_decoder(checkpoints):
    small = load_model(checkpoints["small"], device="cpu", dtype="fp32")
    assert "whole steps" not in small.info.compute and use_decode_step(small.model.language) is None
    assert supports(small.model.language) == "not a Tiny-style language model"
    quantized = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="8bit")
    assert quantized.model.language.decode_step is None
    assert use_decode_step(quantized.model.language) is None
    assert "8-bit" in supports(quantized.model.language)


def test_4bit_whole_steps_give_the_4bit_stock_decoders_logits(checkpoints, monkeypatch):
    """With 4-bit layers the stages call bitsandbytes' CPU kernel on the weights packed at load.
    The reference is the stock decoder on layers never packed (bitsandbytes' generic path:
    dequantize, then multiply), so a wrong packing would show too."""
    monkeypatch.setattr(cpu_decode, "_pack_4bit_for_cpu", lambda language: None)
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    monkeypatch.undo()
    for module in reference.model.language.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    language = loaded.model.language
    if not language.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu:
        # bitsandbytes has its fused CPU 4-bit kernel only for AVX512-BF16 chips; elsewhere the
        # per-module decoder keeps the model, and says why.
        assert language.decode_step is None and "no AVX512-BF16" in supports(language)
        return
    assert loaded.info.compute.endswith("whole steps compiled")
    assert reference.model.language.decode_step is None
    calls = _count_calls(language, monkeypatch)
    torch.manual_seed(3)
    prompt, following = torch.randint(10, 500, (1, 9)), torch.randint(10, 500, (1, 6))
    mask = torch.ones(1, 9, dtype=torch.long)
    fast = _decode(language, loaded.model.new_cache(), prompt, mask, following)
    stock = _decode(reference.model.language, reference.model.new_cache(), prompt, mask, following)
    assert calls["first_stage"] == 6
    # The packed kernel keeps each block's scale in bf16, the generic path in fp32: 1.6 % measured
    # over 6 steps. A wrongly packed weight is off by the order of the logits themselves.
    assert _relative_error(fast, stock) < 5e-2


def test_a_deep_copy_of_the_model_decodes_with_the_stock_decoder(tiny):
    """The step gathered its model's weights at load: a copy (made to compare in fp32, say) must not
    keep a second, stale set of them."""
    copied = copy.deepcopy(tiny.model.language)
    assert copied.decode_step is None and tiny.model.language.decode_step is not None
