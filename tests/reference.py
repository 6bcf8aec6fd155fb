"""Independent re-statements of the official DeepSeek-VL2 computations, written from the
specification (shared/reference/deepseek-vl2-spec.md §3, §2.4), used to check the runtime.

They read the *checkpoint* tensors by their official names, so they also check our renames.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def official_vit(tensors: dict[str, torch.Tensor], tiles: torch.Tensor, heads: int) -> torch.Tensor:
    """timm-style SigLIP ViT as DeepSeek-VL2 runs it: fused qkv, tanh-GELU, final norm, no pool head."""
    w = {k.removeprefix("vision."): v.float() for k, v in tensors.items() if k.startswith("vision.")}
    x = F.conv2d(
        tiles.float(),
        w["patch_embed.proj.weight"],
        w["patch_embed.proj.bias"],
        stride=w["patch_embed.proj.weight"].shape[-1],
    )
    x = x.flatten(2).transpose(1, 2) + w["pos_embed"]
    width = x.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in w if k.startswith("blocks."))
    head_dim = width // heads
    for i in range(depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (width,), w[b + "norm1.weight"], w[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"])
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim), dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(attn, w[b + "attn.proj.weight"], w[b + "attn.proj.bias"])
        h = F.layer_norm(x, (width,), w[b + "norm2.weight"], w[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"]), approximate="tanh")
        x = x + F.linear(h, w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (width,), w["norm.weight"], w["norm.bias"], eps=1e-6)


def official_routing(
    logits: torch.Tensor, *, top_k: int, method: str, bias: torch.Tensor | None = None, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and expert ids per token (spec §2.4)."""
    logits = logits.float()
    if method == "greedy":
        probs = logits.softmax(-1)
        weights, ids = probs.topk(top_k, dim=-1)
        return weights * scale, ids
    scores = logits.sigmoid()
    ids = (scores + bias).topk(top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    return weights / (weights.sum(-1, keepdim=True) + 1e-20) * scale, ids
