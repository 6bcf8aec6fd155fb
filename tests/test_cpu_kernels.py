"""Compiled one-row decode kernels on the CPU: PyTorch's results, used exactly where they should be."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from model.cpu import kernels as cpu_kernels
from model.cpu.kernels import ATTENTION_NAME, CpuLinear, DecodeKernels, decode_kernels, use_decode_kernels
from model.experts import RoutedExperts
from model.loading import load_model

from .test_model_forward import _left_padded_batch

T = TypeVar("T")


@pytest.fixture(scope="module")
def kernels() -> DecodeKernels:
    compiled, decode = decode_kernels({torch.float32, torch.bfloat16})
    assert compiled is not None, decode  # CI has a C++ compiler; the fallback has its own test
    return compiled


def _counting(functions: T) -> tuple[T, Counter]:
    """A copy of a dataclass of functions (DecodeKernels, StepGraphs) that counts calls by name."""
    calls: Counter = Counter()

    def counted(name):
        function = getattr(functions, name)

        def call(*args):
            calls[name] += 1
            return function(*args)

        return call

    return dataclasses.replace(functions, **{f.name: counted(f.name) for f in dataclasses.fields(functions)}), calls


def _tolerance(dtype: torch.dtype) -> dict:
    return {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [96, 5000])  # Inductor compiles reductions over 4,096 separately
def test_one_row_products_and_swiglu_match_pytorch(kernels, dtype, width):
    torch.manual_seed(0)
    weight, down = torch.randn(40, width, dtype=dtype) / width**0.5, torch.randn(width, 20, dtype=dtype) / 20**0.5
    gate, up = weight[:20], weight[20:]
    with torch.inference_mode():
        x = torch.randn(width, dtype=dtype)
        torch.testing.assert_close(kernels.one_row_product(x, weight), F.linear(x, weight), **_tolerance(dtype))
        expected = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
        torch.testing.assert_close(kernels.one_row_swiglu(x, gate, up, down), expected, **_tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_matches_sdpa_with_and_without_padding(kernels, dtype):
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.decode_kernels = kernels
    with torch.inference_mode():
        query, key, value = (torch.randn(2, 4, length, 32, dtype=dtype) for length in (1, 50, 50))
        padded = torch.ones(2, 1, 1, 50, dtype=torch.bool)
        padded[0, ..., :7] = False  # the first row is left-padded
        for mask in (None, padded):
            got, _ = cpu_kernels.cpu_decode_attention(module, query, key, value, mask, scaling=0.2)
            expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.2)
            assert got.shape == expected.shape == (2, 1, 4, 32)
            torch.testing.assert_close(got, expected, **_tolerance(dtype))


@pytest.mark.parametrize("causal_mask", [False, True])
def test_mla_prompts_pad_narrow_values_so_sdpa_keeps_its_flash_kernel(monkeypatch, causal_mask):
    # MLA: queries and keys 24 wide, values 16. Unpadded, PyTorch's CPU SDPA falls back to its math
    # path (every score materialized); the padded call must give the same attention.
    widths = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        widths.append(value.shape[-1])
        return original(query, key, value, *args, **kwargs)

    module = torch.nn.Module()
    module.is_causal = not causal_mask
    query, key = torch.randn(1, 4, 9, 24), torch.randn(1, 4, 9, 24)
    value = torch.randn(1, 4, 9, 16)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] if causal_mask else None
    with torch.inference_mode():
        expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
        monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
        got, _ = cpu_kernels.cpu_decode_attention(module, query, key, value, mask, scaling=0.3)
    assert widths == [24] and got.shape == expected.shape == (1, 9, 4, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompts_and_autograd_keep_pytorchs_kernels(kernels):
    counting, calls = _counting(kernels)
    module = torch.nn.Module()
    module.decode_kernels = counting
    query, key, value = (torch.randn(1, 4, length, 32) for length in (6, 6, 6))
    with torch.inference_mode():
        got, _ = cpu_kernels.cpu_decode_attention(module, query, key, value, None)  # a prompt: 6 queries
        expected, _ = sdpa_attention_forward(module, query, key, value, None)
    assert torch.equal(got, expected) and calls["one_query_attention"] == 0

    linear = torch.nn.Linear(32, 16)
    assert cpu_kernels.as_cpu_linear(linear) is linear and isinstance(linear, CpuLinear)
    linear.one_row_product = counting.one_row_product
    row, rows = torch.randn(1, 1, 32), torch.randn(1, 5, 32)
    with torch.no_grad():  # not inference_mode: PyTorch's product, bit for bit
        assert torch.equal(linear(row), F.linear(row, linear.weight, linear.bias))
    with torch.inference_mode():
        assert torch.equal(linear(rows), F.linear(rows, linear.weight, linear.bias))
        assert calls["one_row_product"] == 0
        one = linear(row)
    assert calls["one_row_product"] == 1 and one.shape == (1, 1, 16)
    torch.testing.assert_close(one, F.linear(row, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)


def test_a_cpu_load_decodes_with_the_kernels_and_gives_pytorchs_tokens(checkpoints, kernels, monkeypatch):
    monkeypatch.setenv("VL2_CPU_KERNELS", "eager")
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="fp32")
    assert "PyTorch's kernels (VL2_CPU_KERNELS=eager)" in reference.info.compute
    monkeypatch.setenv("VL2_CPU_KERNELS", "auto")
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="fp32")
    assert "decode: compiled one-row kernels" in loaded.info.compute
    assert loaded.model.language.config._attn_implementation == ATTENTION_NAME
    counting, calls = _counting(kernels)
    use_decode_kernels(loaded.model.language, counting)

    batch = _left_padded_batch(loaded.processor)
    settings = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "output_logits": True,
                "return_dict_in_generate": True, "pad_token_id": loaded.processor.special.pad}  # fmt: skip
    runs = {}
    for name, model in (("eager", reference.model), ("compiled", loaded.model)):
        embeds = model.prepare_inputs_embeds(
            batch["input_ids"], batch["pixel_values"], batch["images_seq_mask"], batch["images_spatial_crop"]
        )
        with torch.inference_mode():
            runs[name] = model.language.generate(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], cache=model.new_cache(), **settings
            )
    assert torch.equal(runs["compiled"].sequences, runs["eager"].sequences)
    for got, expected in zip(runs["compiled"].logits, runs["eager"].logits, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    layers = loaded.model.config.text_config.num_hidden_layers
    decode_steps = 5  # the first of the 6 tokens comes from the prompt
    assert calls["one_query_attention"] == decode_steps * layers
    assert calls["one_row_product"] == 0  # a batch of two rows: PyTorch's products


def test_single_sequence_decode_steps_use_one_call_per_mlp_and_per_token_experts(checkpoints, kernels):
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    language = loaded.model.language
    language.decode_step = None  # the per-module path, as Small and base decode (model/cpu/decode.py)
    counting, calls = _counting(kernels)
    use_decode_kernels(language, counting)
    layers = language.model.layers
    moe_layers = sum(isinstance(getattr(layer.mlp, "experts", None), RoutedExperts) for layer in layers)
    shared = 1 if loaded.model.config.text_config.n_shared_experts else 0  # the shared experts are one MLP
    with torch.inference_mode():
        out = language(input_ids=torch.randint(10, 200, (1, 12)), cache=loaded.model.new_cache(), use_cache=True)
        calls.clear()  # the prompt's counts depend on the routing; count the decode steps
        for _ in range(3):
            out = language(input_ids=out.logits[:, -1:].argmax(-1), cache=out.cache, use_cache=True)
    assert calls["routed_one_row"] == 3 * moe_layers  # each token's routed experts in one call
    assert calls["one_row_swiglu"] == 3 * (moe_layers * shared + len(layers) - moe_layers)  # shared, dense
    assert calls["one_query_attention"] == 3 * len(layers)
    assert calls["one_row_product"] == 3 * (4 * len(layers) + 1)  # q, k, v, o per layer; lm_head


def test_without_a_compiler_the_model_keeps_pytorchs_kernels(checkpoints, monkeypatch):
    def no_compiler():
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    monkeypatch.setattr(cpu_kernels, "_compile", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_compiled", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setattr(cpu_kernels, "_warmed", set())
    monkeypatch.setenv("VL2_CPU_KERNELS", "compiled")
    with pytest.raises(RuntimeError, match="VL2_CPU_KERNELS=compiled but compiling failed"):
        decode_kernels({torch.float32})
    monkeypatch.setenv("VL2_CPU_KERNELS", "auto")
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="fp32")
    assert "PyTorch's kernels (compiling failed: RuntimeError: InvalidCxxCompiler" in loaded.info.compute
    assert not any(getattr(m, "one_row_product", None) for m in loaded.model.modules())
    from model.processing import Message

    inputs = loaded.processor([Message("user", "Hello")])
    assert loaded.model.generate(**inputs, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape == (1, 2)
    monkeypatch.setenv("VL2_CPU_KERNELS", "fast")
    with pytest.raises(ValueError, match="auto, compiled or eager"):
        decode_kernels({torch.float32})


def test_the_cpu_share_of_a_4bit_model_keeps_bitsandbytes_kernels(checkpoints):
    from model.cpu.compute import apply_cpu_compute

    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    assert "decode: compiled one-row kernels" in loaded.info.compute  # attention and lm_head stay bf16
    layers = loaded.model.language.model.layers
    cpu_share = torch.nn.ModuleList(layers[i].mlp.experts for i in (1, 2))  # as load_model passes a placement's
    plan = apply_cpu_compute(cpu_share)
    assert plan is not None and plan.decode == "bitsandbytes' kernels"
    assert cpu_kernels._failure is None  # packed 4-bit bytes were not mistaken for a weight dtype
