"""4-bit / 8-bit: experts really quantized, full-precision parts kept, clear errors where unavailable."""

from __future__ import annotations

import sys

import bitsandbytes as bnb
import pytest
import torch

from model.cpu.kernels import CpuLinear
from model.experts import RoutedExperts
from model.loading import ModelLoadError, QuantizationUnavailable, load_model, unquantized_expert_weights
from model.processing import Message

from .test_model_forward import _gradient_image


def _quantized_linear_types():
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize(("variant", "quantization"), [("tiny", "4bit"), ("small", "4bit"), ("base", "8bit")])
def test_experts_are_really_quantized(variant, quantization, checkpoints, loaded_fp32):
    loaded = load_model(checkpoints[variant], device="cpu", dtype="bf16", quantization=quantization)
    model = loaded.model
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    assert experts, "no MoE layers found"
    for module in experts:
        for expert in module:
            for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                assert isinstance(linear, _quantized_linear_types())
    assert unquantized_expert_weights(model) == []
    storage = "uint8" if quantization == "4bit" else "int8"
    assert loaded.info.bytes_by_dtype[storage] > 0
    # Kept in full precision on purpose: vision, projector, lm_head.
    assert model.vision.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert type(model.projector.layers[0]) is torch.nn.Linear
    assert type(model.language.lm_head) in (torch.nn.Linear, CpuLinear)  # CpuLinear: same weight, CPU kernels
    # Smaller than the fp32 load of the same weights, and still answers.
    assert loaded.info.total_bytes < loaded_fp32[variant].info.total_bytes / 2
    inputs = loaded.processor([Message("user", "<|ref|>a dot<|/ref|>.", [_gradient_image(300, 200)])])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_quantized_logits_stay_close_to_unquantized(checkpoints, loaded_fp32):
    reference = loaded_fp32["tiny"]
    quantized = load_model(checkpoints["tiny"], device="cpu", dtype="fp32", quantization="4bit")
    inputs = reference.processor([Message("user", "Describe it.", [_gradient_image(200, 200)])])
    with torch.no_grad():
        expected = reference.model(**inputs).logits[0, -1]
        got = quantized.model(**inputs).logits[0, -1]
    relative = (got - expected).norm() / expected.norm()
    assert relative < 0.5, f"relative logit error {relative:.3f}"


def test_missing_bitsandbytes_gives_an_actionable_message(checkpoints, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(QuantizationUnavailable, match=r"pip install bitsandbytes.*--quantization none"):
        load_model(checkpoints["tiny"], device="cpu", quantization="4bit")


def test_device_without_a_bitsandbytes_backend_gives_an_actionable_message(checkpoints, monkeypatch):
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cuda"})
    with pytest.raises(QuantizationUnavailable, match=r"no cpu backend.*--quantization none"):
        load_model(checkpoints["tiny"], device="cpu", quantization="4bit")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_asking_for_cuda_without_a_gpu_is_explained(checkpoints):
    with pytest.raises(ModelLoadError, match="no CUDA GPU"):
        load_model(checkpoints["tiny"], device="cuda", quantization="4bit")
