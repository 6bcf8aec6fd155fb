"""The CPU's per-phase GEMM dtype: fp32 for many-row products where bf16 GEMM is slow, bf16 for decode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.configuration import vision_config_from_official
from model.cpu.compute import (
    MIN_ROWS_FOR_FP32,
    GemmSpeeds,
    apply_cpu_compute,
    measure_gemm_speeds,
    use_fp32_for_many_rows,
    vision_tiles_per_batch,
)
from model.cpu.kernels import CpuLinear
from model.loading import load_model
from model.processing import Message
from model.testing import official_config

from .test_model_forward import _gradient_image

SLOW_BF16 = GemmSpeeds(fp32_gflops=70.0, bf16_gflops=12.0)  # an AVX2 chip, as measured in quant-perf.md
FAST_BF16 = GemmSpeeds(fp32_gflops=150.0, bf16_gflops=420.0)  # AVX512-BF16


def test_measured_speeds_are_positive_and_decide_the_choice():
    speeds = measure_gemm_speeds(rows=64, size=256, seconds=0.02)
    assert speeds.fp32_gflops > 0 and speeds.bf16_gflops > 0
    assert SLOW_BF16.bf16_is_slow and not FAST_BF16.bf16_is_slow


def test_many_rows_multiply_in_fp32_and_few_rows_in_bf16():
    torch.manual_seed(0)
    linear = nn.Linear(96, 64).to(torch.bfloat16)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    assert use_fp32_for_many_rows(nn.Sequential(linear)) == 1
    assert isinstance(linear, CpuLinear) and linear.fp32_from_rows == MIN_ROWS_FOR_FP32
    assert torch.equal(linear.weight, weight)  # same parameters
    many = torch.randn(2, MIN_ROWS_FOR_FP32, 96, dtype=torch.bfloat16)
    few = torch.randn(1, MIN_ROWS_FOR_FP32 - 1, 96, dtype=torch.bfloat16)
    with torch.no_grad():
        out_many, out_few = linear(many), linear(few)
    assert out_many.dtype == out_few.dtype == torch.bfloat16  # activations (and the KV cache) keep one dtype
    assert torch.equal(out_many, F.linear(many.float(), weight.float(), bias.float()).to(torch.bfloat16))
    assert torch.equal(out_few, F.linear(few, weight, bias))


def _inputs(processor):
    return processor([Message("user", "<|ref|>the red part<|/ref|>", [_gradient_image(420, 300)])])


def test_on_a_slow_bf16_cpu_prefill_and_vision_run_in_fp32_and_stay_close(checkpoints, monkeypatch):
    monkeypatch.setenv("VL2_CPU_GEMM", "auto")
    reference = load_model(checkpoints["small"], device="cpu", dtype="fp32")
    loaded = load_model(checkpoints["small"], device="cpu", dtype="bf16")
    plain = load_model(checkpoints["small"], device="cpu", dtype="bf16")
    plan = apply_cpu_compute(loaded.model, SLOW_BF16)
    assert plan is not None and plan.fp32_for_many_rows and "fp32 for prefill" in plan.describe()
    model = loaded.model
    assert model.vision.embeddings.patch_embedding.weight.dtype == torch.float32
    assert model.projector.layers[0].weight.dtype == torch.float32
    linears = [m for m in model.language.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, CpuLinear) and m.fp32_from_rows for m in linears)
    assert all(m.weight.dtype == torch.bfloat16 for m in linears)  # storage stays bf16
    inputs = _inputs(loaded.processor)
    with torch.no_grad():
        expected = reference.model(**inputs).logits[0, -1]
        mixed = model(**inputs).logits[0, -1].float()
        bf16 = plain.model(**inputs).logits[0, -1].float()
        tokens = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    mixed_error = ((mixed - expected).norm() / expected.norm()).item()
    bf16_error = ((bf16 - expected).norm() / expected.norm()).item()
    assert mixed_error < 0.05 and mixed_error <= 1.5 * bf16_error  # as close as plain bf16
    assert tokens.shape == (1, 4)


def test_on_a_fast_bf16_cpu_nothing_changes(checkpoints, monkeypatch):
    monkeypatch.setenv("VL2_CPU_GEMM", "auto")
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    plan = apply_cpu_compute(loaded.model, FAST_BF16)
    assert plan is not None and not plan.fp32_for_many_rows and "bf16 throughout" in plan.describe()
    assert not any(getattr(m, "fp32_from_rows", None) for m in loaded.model.modules())
    assert loaded.model.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16


def test_cpu_vision_batches_keep_one_mlp_activation_under_the_budget():
    siglip = vision_config_from_official(official_config("tiny", full_size=True)["vision_config"])
    # 729 patches x 4304 MLP values: 6.3 MB a tile in bf16, 12.5 MB in fp32; budget 24 MiB
    assert vision_tiles_per_batch(siglip, element_size=2, default=8) == 4
    assert vision_tiles_per_batch(siglip, element_size=4, default=8) == 2
    assert vision_tiles_per_batch(siglip, element_size=4, default=1) == 1


def test_a_cpu_model_gets_its_vision_batch_size(checkpoints):
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    vision = loaded.model.config.vision_config
    expected = vision_tiles_per_batch(vision, element_size=2, default=8)
    assert loaded.model.vision_tiles_per_batch == expected
    assert f"vision: {expected} tiles a batch" in loaded.info.compute


def test_the_loader_records_its_choice(checkpoints, monkeypatch):
    monkeypatch.setenv("VL2_CPU_GEMM", "fp32")
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    assert "fp32 for prefill and vision" in loaded.info.compute
    assert loaded.model.vision.embeddings.patch_embedding.weight.dtype == torch.float32
    monkeypatch.setenv("VL2_CPU_GEMM", "fast")
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    monkeypatch.setenv("VL2_CPU_GEMM", "auto")
    fp32 = load_model(checkpoints["tiny"], device="cpu", dtype="fp32").info.compute
    assert fp32.startswith("CPU GEMM: fp32 throughout; vision: ")  # nothing to choose


def test_four_bit_layers_switch_compute_dtype_by_rows(checkpoints, monkeypatch):
    monkeypatch.setenv("VL2_CPU_GEMM", "fp32")
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    quantized = [m for m in loaded.model.language.modules() if type(m).__name__ == "Linear4bit"]
    assert quantized
    layer = quantized[0]
    with torch.no_grad():
        layer(torch.randn(1, MIN_ROWS_FOR_FP32, layer.in_features, dtype=torch.bfloat16))
        assert layer.compute_dtype == torch.float32
        out = layer(torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16))
        assert layer.compute_dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    inputs = _inputs(loaded.processor)
    with torch.no_grad():
        assert loaded.model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape == (1, 3)


@pytest.mark.parametrize(("preset", "expected"), [(None, "1"), ("64", "64")])
def test_importing_the_runtime_bounds_ideeps_shape_cache_unless_the_user_chose(preset, expected):
    # In a fresh interpreter: the variable only matters before the first oneDNN product.
    env = {key: value for key, value in os.environ.items() if key != "LRU_CACHE_CAPACITY"}
    if preset is not None:
        env["LRU_CACHE_CAPACITY"] = preset
    script = "import os, model; print(os.environ['LRU_CACHE_CAPACITY'])"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == expected
