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


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, -1)
    return torch.cat((-second, first), -1)


def _cos_sin(dim: int, length: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))
    angles = torch.outer(torch.arange(length).float(), inv)
    both = torch.cat((angles, angles), -1)
    return both.cos(), both.sin()


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def official_language_logits(tensors: dict[str, torch.Tensor], lc: dict, x: torch.Tensor) -> torch.Tensor:
    """The official language model on one sequence of input embeddings ``[T, D]`` (spec §2), in fp32.

    Tiny: multi-head attention with rotate-half RoPE over the full head. Small/base: MLA with the
    latent normalised, RoPE on de-interleaved pairs, scores scaled by (nope+rope)^-1/2. MoE: fp32
    router, top-6 (softmax, not renormalised; or sigmoid + bias choice, renormalised, × scale),
    routed mix plus shared experts; dense layers before ``first_k_dense_replace``.
    """
    w = {k: v.float() for k, v in tensors.items()}
    length, width = x.shape
    heads = lc.get("num_attention_heads", 32)
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(lc.get("num_hidden_layers", 30)):
        p = f"language.model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"])
        if lc.get("use_mla", True):
            n, r, v = lc.get("qk_nope_head_dim", 128), lc.get("qk_rope_head_dim", 64), lc.get("v_head_dim", 128)
            c = lc.get("kv_lora_rank", 512)
            q = F.linear(h, w[p + "self_attn.q_proj.weight"]).view(length, heads, n + r).transpose(0, 1)
            latent = F.linear(h, w[p + "self_attn.kv_a_proj_with_mqa.weight"])
            ckv, k_pe = _rms(latent[:, :c], w[p + "self_attn.kv_a_layernorm.weight"]), latent[:, c:]
            kv = F.linear(ckv, w[p + "self_attn.kv_b_proj.weight"]).view(length, heads, n + v).transpose(0, 1)
            cos, sin = _cos_sin(r, length)

            def deinterleave(t: torch.Tensor, r: int = r) -> torch.Tensor:
                return t.view(*t.shape[:-1], r // 2, 2).transpose(-1, -2).reshape(t.shape)

            q_pe, k_rot = deinterleave(q[..., n:]), deinterleave(k_pe.unsqueeze(0))
            q_pe = q_pe * cos + _rotate_half(q_pe) * sin
            k_rot = k_rot * cos + _rotate_half(k_rot) * sin
            queries = torch.cat([q[..., :n], q_pe], -1)
            keys = torch.cat([kv[..., :n], k_rot.expand(heads, length, r)], -1)
            scores = queries @ keys.transpose(-1, -2) * (n + r) ** -0.5 + mask
            out = (scores.softmax(-1) @ kv[..., n:]).transpose(0, 1).reshape(length, heads * v)
        else:
            head = width // heads

            q, k, values = (
                F.linear(h, w[p + f"self_attn.{name}.weight"]).view(length, heads, head).transpose(0, 1)
                for name in ("q_proj", "k_proj", "v_proj")
            )
            cos, sin = _cos_sin(head, length)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            scores = q @ k.transpose(-1, -2) / math.sqrt(head) + mask
            out = (scores.softmax(-1) @ values).transpose(0, 1).reshape(length, width)
        x = x + F.linear(out, w[p + "self_attn.o_proj.weight"])
        h = _rms(x, w[p + "post_attention_layernorm.weight"])
        if i < lc["first_k_dense_replace"]:
            y = _swiglu(h, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
        else:
            weights, ids = official_routing(
                F.linear(h, w[p + "mlp.gate.weight"]),
                top_k=lc["num_experts_per_tok"],
                method="noaux_tc" if lc.get("topk_method") == "noaux_tc" else "greedy",
                bias=w.get(p + "mlp.gate.e_score_correction_bias"),
                scale=lc.get("routed_scaling_factor", 1.0),
            )
            y = torch.zeros_like(h)
            for t in range(length):
                for j in range(ids.shape[1]):
                    e = f"{p}mlp.experts.{int(ids[t, j])}."
                    y[t] += weights[t, j] * _swiglu(
                        h[t], w[e + "gate_proj.weight"], w[e + "up_proj.weight"], w[e + "down_proj.weight"]
                    )
            s = p + "mlp.shared_experts."
            y = y + _swiglu(h, w[s + "gate_proj.weight"], w[s + "up_proj.weight"], w[s + "down_proj.weight"])
        x = x + y
    return F.linear(_rms(x, w["language.model.norm.weight"]), w["language.lm_head.weight"])
