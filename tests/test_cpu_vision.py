"""The vision MLP on the CPU: fc1 and its GELU fused into one oneDNN product."""

from __future__ import annotations

import torch
from transformers.models.siglip.modeling_siglip import SiglipMLP

from model.configuration import vision_config_from_official
from model.cpu import vision as cpu_vision
from model.cpu.vision import FusedGeluMLP, fuse_vision_mlp
from model.loading import load_model
from model.testing import official_config


def _tiles(model, count: int = 2) -> torch.Tensor:
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    dtype = model.vision.embeddings.patch_embedding.weight.dtype
    return torch.randn(count, 3, size, size, generator=generator).to(dtype)


def test_a_cpu_load_fuses_every_vision_mlp_and_says_so(checkpoints):
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    mlps = [m for m in loaded.model.vision.modules() if isinstance(m, SiglipMLP)]
    assert mlps and all(type(m) is FusedGeluMLP for m in mlps)
    assert len(mlps) == loaded.model.config.vision_config.num_hidden_layers
    assert "fc1 and GELU fused" in loaded.info.compute


def test_fused_vision_is_as_close_to_fp32_as_the_stock_one(checkpoints):
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="fp32").model
    fused = load_model(checkpoints["tiny"], device="cpu", dtype="bf16").model
    stock = load_model(checkpoints["tiny"], device="cpu", dtype="bf16").model
    for mlp in stock.vision.modules():
        if isinstance(mlp, FusedGeluMLP):
            mlp.__class__ = SiglipMLP
    tiles = _tiles(fused)
    with torch.no_grad():
        expected = reference.encode_tiles(tiles.float()).float()
        got = fused.encode_tiles(tiles).float()
        plain = stock.encode_tiles(tiles).float()
    error = ((got - expected).norm() / expected.norm()).item()
    stock_error = ((plain - expected).norm() / expected.norm()).item()
    assert not torch.equal(got, plain)  # the fused path really ran
    assert error < 0.05 and error <= 1.5 * stock_error


def test_fp32_fused_matches_the_stock_mlp_and_gradients_take_the_stock_path():
    torch.manual_seed(0)
    config = vision_config_from_official(official_config("tiny")["vision_config"])
    mlp = SiglipMLP(config)
    x = torch.randn(2, 5, config.hidden_size)
    with torch.no_grad():
        expected = mlp(x)
    assert fuse_vision_mlp(mlp) == "fc1 and GELU fused" and type(mlp) is FusedGeluMLP
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    out = mlp(x.requires_grad_())  # the fused op has no autograd: the stock forward runs
    out.sum().backward()
    assert mlp.fc1.weight.grad is not None
    assert fuse_vision_mlp(mlp) == "fc1 and GELU fused"  # a second call (after .float()) checks again


def test_a_failing_fused_op_leaves_the_stock_mlp_with_the_reason(checkpoints, monkeypatch):
    def broken(*args):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(cpu_vision, "_linear_gelu", broken)
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="bf16")
    assert all(type(m) is SiglipMLP for m in loaded.model.vision.modules() if isinstance(m, SiglipMLP))
    assert "MLP stock (fused GELU failed: RuntimeError: no oneDNN here)" in loaded.info.compute
    with torch.no_grad():
        assert torch.isfinite(loaded.model.encode_tiles(_tiles(loaded.model, 1)).float()).all()
