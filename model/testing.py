"""Random-weight checkpoints in the exact official hub layout, for tests and benchmarks.

The hub is unreachable from CI, so tests build a checkpoint that looks like the published ones —
``config.json`` in the published key format, ``processor_config.json``, tokenizer files with the
same special tokens in the same order, sharded safetensors with the official (timm / per-expert)
key names and an index — and load it through the very function that loads the real models.

The tensor list is written from the official layout description (``official_tensor_shapes``), not
from our model's ``state_dict``: a test that loads it checks our renames against the real names.

Usage::

    python -m model.testing make-checkpoint OUT --variant tiny|small|base [--full-size] [--shards N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer

from .tokenizer import BOS_TOKEN, EOS_TOKEN, write_test_tokenizer

VARIANTS = ("tiny", "small", "base")

CANDIDATE_RESOLUTIONS = [
    [384, 384], [384, 768], [768, 384], [384, 1152], [1152, 384], [384, 1536], [1536, 384],
    [768, 768], [384, 1920], [1920, 384], [384, 2304], [2304, 384], [768, 1152], [1152, 768],
    [384, 2688], [2688, 384], [384, 3072], [3072, 384], [768, 1536], [1536, 768], [384, 3456],
    [3456, 384], [1152, 1152],
]  # fmt: skip

FULL_VISION = {
    "model_type": "vision",
    "model_name": "siglip_so400m_patch14_384",
    "layers": 27,
    "width": 1152,
    "patch_size": 14,
    "mlp_ratio": 3.7362,
}
SMALL_VISION = {**FULL_VISION, "layers": 2, "width": 32, "heads": 2, "mlp_ratio": 2.0}

# language_config blocks as published (Tiny and base verbatim key sets; base omits the keys it
# inherits from the official defaults: layer count, heads, kv heads, MLA dims).
FULL_LANGUAGE: dict[str, dict[str, Any]] = {
    "tiny": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV2Config",
            "AutoModel": "modeling_deepseek.DeepseekV2Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
        },
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_size": 1280,
        "intermediate_size": 6848,
        "kv_lora_rank": None,
        "lm_head": True,
        "max_position_embeddings": 4096,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 896,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_attention_heads": 10,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 12,
        "num_key_value_heads": 10,
        "q_lora_rank": None,
        "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0,
        "rm_head": False,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "use_mla": False,
        "v_head_dim": 0,
        "vocab_size": 129280,
    },
    "small": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "bos_token_id": 100000,
        "eos_token_id": 100001,
        "first_k_dense_replace": 1,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "kv_lora_rank": 512,
        "max_position_embeddings": 4096,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408,
        "n_group": 1,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_attention_heads": 16,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 27,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "topk_group": 1,
        "topk_method": "greedy",
        "torch_dtype": "bfloat16",
        "v_head_dim": 128,
        "vocab_size": 102400,
    },
    "base": {
        "architectures": ["DeepseekV2ForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_size": 2560,
        "intermediate_size": 12288,
        "lm_head": False,
        "max_position_embeddings": 4096,
        "model_type": "deepseek_v2",
        "moe_intermediate_size": 1536,
        "n_group": 1,
        "n_routed_experts": 72,
        "n_shared_experts": 2,
        "norm_topk_prob": True,
        "num_experts_per_tok": 6,
        "q_lora_rank": None,
        "rm_head": False,
        "routed_scaling_factor": 2.0,
        "scoring_func": "sigmoid",
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "vocab_size": 129280,
    },
}

# Small test dimensions: every structural feature kept (dense layer 0, MoE after, shared experts,
# top-6 routing, MLA with a latent and a rope part), sizes cut so a forward pass takes milliseconds.
# Widths stay multiples of 64 (inputs) and 32 (outputs) like the real ones: bitsandbytes' CPU 4-bit kernels need that.
SMALL_OVERRIDES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "vocab_size": 1024,
    },
    "small": {
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8, "vocab_size": 1024,
        "kv_lora_rank": 56, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    },
    "base": {
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 12, "vocab_size": 1024,
        "kv_lora_rank": 56, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    },
}  # fmt: skip

PROCESSOR_CONFIG = {
    "add_special_token": False,
    "candidate_resolutions": CANDIDATE_RESOLUTIONS,
    "downsample_ratio": 2,
    "ignore_id": -100,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_token": "<image>",
    "mask_prompt": False,
    "normalize": True,
    "pad_token": "<｜▁pad▁｜>",
    "patch_size": 14,
    "processor_class": "DeepseekVLV2Processor",
    "sft_format": "deepseek",
}

# The official defaults a published language_config may omit (same values as model.configuration).
_OMITTABLE = {"num_hidden_layers": 30, "num_attention_heads": 32, "num_key_value_heads": 32, "kv_lora_rank": 512,
              "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "moe_layer_freq": 1,
              "routed_scaling_factor": 1.0, "norm_topk_prob": False, "scoring_func": "softmax",
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0}  # fmt: skip


def official_config(variant: str, *, full_size: bool = False) -> dict[str, Any]:
    """A ``config.json`` dict in the published format."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    language = dict(FULL_LANGUAGE[variant])
    vision = dict(FULL_VISION)
    if not full_size:
        language.update(SMALL_OVERRIDES[variant])
        vision = dict(SMALL_VISION)
    width = vision["width"]
    return {
        "candidate_resolutions": CANDIDATE_RESOLUTIONS,
        "global_view_pos": "head",
        "language_config": language,
        "model_type": "deepseek_vl_v2",
        "projector_config": {
            "model_type": "mlp_projector",
            "n_embed": language["hidden_size"],
            "input_dim": width,
        },
        "tile_tag": "2D",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.38.2",
        "vision_config": vision,
    }


def _lang(language: dict[str, Any], key: str) -> Any:
    return language.get(key, _OMITTABLE.get(key))


def official_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an official checkpoint with this config, by its published key name."""
    shapes: dict[str, tuple[int, ...]] = {}
    v = config["vision_config"]
    width, depth = int(v["width"]), int(v["layers"])
    mlp = int(width * float(v["mlp_ratio"]))
    patch = int(v["patch_size"])
    grid = int(v.get("image_size", 384)) // patch
    shapes["vision.pos_embed"] = (1, grid * grid, width)
    shapes["vision.patch_embed.proj.weight"] = (width, 3, patch, patch)
    shapes["vision.patch_embed.proj.bias"] = (width,)
    for i in range(depth):
        b = f"vision.blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[f"{b}{norm}.weight"] = shapes[f"{b}{norm}.bias"] = (width,)
        shapes[f"{b}attn.qkv.weight"], shapes[f"{b}attn.qkv.bias"] = (3 * width, width), (3 * width,)
        shapes[f"{b}attn.proj.weight"], shapes[f"{b}attn.proj.bias"] = (width, width), (width,)
        shapes[f"{b}mlp.fc1.weight"], shapes[f"{b}mlp.fc1.bias"] = (mlp, width), (mlp,)
        shapes[f"{b}mlp.fc2.weight"], shapes[f"{b}mlp.fc2.bias"] = (width, mlp), (width,)
    shapes["vision.norm.weight"] = shapes["vision.norm.bias"] = (width,)
    # The attention-pool head: stored, never used by DeepSeek-VL2.
    shapes["vision.attn_pool.latent"] = (1, 1, width)
    shapes["vision.attn_pool.q.weight"], shapes["vision.attn_pool.q.bias"] = (width, width), (width,)
    shapes["vision.attn_pool.kv.weight"], shapes["vision.attn_pool.kv.bias"] = (
        (2 * width, width),
        (2 * width,),
    )
    shapes["vision.attn_pool.proj.weight"], shapes["vision.attn_pool.proj.bias"] = (width, width), (width,)
    shapes["vision.attn_pool.norm.weight"] = shapes["vision.attn_pool.norm.bias"] = (width,)
    shapes["vision.attn_pool.mlp.fc1.weight"], shapes["vision.attn_pool.mlp.fc1.bias"] = (mlp, width), (mlp,)
    shapes["vision.attn_pool.mlp.fc2.weight"], shapes["vision.attn_pool.mlp.fc2.bias"] = (
        (width, mlp),
        (width,),
    )

    lang = config["language_config"]
    d = int(lang["hidden_size"])
    shapes["projector.layers.0.weight"] = (d, 4 * width)
    shapes["projector.layers.0.bias"] = (d,)
    shapes["projector.layers.2.weight"] = (d, d)
    shapes["projector.layers.2.bias"] = (d,)
    shapes["image_newline"] = (d,)
    shapes["view_seperator"] = (d,)

    vocab = int(lang["vocab_size"])
    heads = int(_lang(lang, "num_attention_heads"))
    layers = int(_lang(lang, "num_hidden_layers"))
    experts, shared = int(lang["n_routed_experts"]), int(lang["n_shared_experts"])
    moe_i, dense_i = int(lang["moe_intermediate_size"]), int(lang["intermediate_size"])
    use_mla = lang.get("use_mla", True)
    shapes["language.model.embed_tokens.weight"] = (vocab, d)
    shapes["language.model.norm.weight"] = (d,)
    shapes["language.lm_head.weight"] = (vocab, d)
    for i in range(layers):
        b = f"language.model.layers.{i}."
        shapes[f"{b}input_layernorm.weight"] = shapes[f"{b}post_attention_layernorm.weight"] = (d,)
        if use_mla:
            nope, rope, vdim = (int(_lang(lang, k)) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
            rank = int(_lang(lang, "kv_lora_rank"))
            shapes[f"{b}self_attn.q_proj.weight"] = (heads * (nope + rope), d)
            shapes[f"{b}self_attn.kv_a_proj_with_mqa.weight"] = (rank + rope, d)
            shapes[f"{b}self_attn.kv_a_layernorm.weight"] = (rank,)
            shapes[f"{b}self_attn.kv_b_proj.weight"] = (heads * (nope + vdim), rank)
            shapes[f"{b}self_attn.o_proj.weight"] = (d, heads * vdim)
        else:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                shapes[f"{b}self_attn.{proj}.weight"] = (d, d)
        if i < int(lang["first_k_dense_replace"]):
            shapes[f"{b}mlp.gate_proj.weight"] = shapes[f"{b}mlp.up_proj.weight"] = (dense_i, d)
            shapes[f"{b}mlp.down_proj.weight"] = (d, dense_i)
            continue
        shapes[f"{b}mlp.gate.weight"] = (experts, d)
        if lang.get("topk_method") == "noaux_tc":
            shapes[f"{b}mlp.gate.e_score_correction_bias"] = (experts,)
        for e in range(experts):
            shapes[f"{b}mlp.experts.{e}.gate_proj.weight"] = (moe_i, d)
            shapes[f"{b}mlp.experts.{e}.up_proj.weight"] = (moe_i, d)
            shapes[f"{b}mlp.experts.{e}.down_proj.weight"] = (d, moe_i)
        shapes[f"{b}mlp.shared_experts.gate_proj.weight"] = (shared * moe_i, d)
        shapes[f"{b}mlp.shared_experts.up_proj.weight"] = (shared * moe_i, d)
        shapes[f"{b}mlp.shared_experts.down_proj.weight"] = (d, shared * moe_i)
    return shapes


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Plausible random values: norms near one, biases near zero, weights scaled by fan-in."""

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=generator.device)

    if key.endswith(("norm1.weight", "norm2.weight", "norm.weight", "layernorm.weight")):
        return 1.0 + 0.02 * randn(shape)
    if key.endswith("bias") or key.endswith("latent"):
        return 0.02 * randn(shape)
    fan_in = shape[-1] if len(shape) > 1 else 1
    if key.endswith("patch_embed.proj.weight"):
        fan_in = math.prod(shape[1:])
    std = 1.0 / math.sqrt(fan_in) if not key.endswith(("embed_tokens.weight", "pos_embed")) else 0.02
    if key in ("image_newline", "view_seperator"):
        std = 1.0 / math.sqrt(shape[0])
    return std * randn(shape)


def _shard_plan(shapes: dict[str, tuple[int, ...]], shards: int) -> list[list[str]]:
    keys = list(shapes)
    sizes = [math.prod(shapes[k]) for k in keys]
    target = sum(sizes) / shards
    plan: list[list[str]] = [[]]
    running = 0.0
    for key, size in zip(keys, sizes, strict=True):
        if running >= target * len(plan) and len(plan) < shards:
            plan.append([])
        plan[-1].append(key)
        running += size
    while len(plan) < shards:
        plan.append([])
    return plan


def _iter_shard_tensors(
    keys: list[str], shapes: dict[str, tuple[int, ...]], generator: torch.Generator, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    for key in keys:
        yield key, _random_tensor(key, shapes[key], generator).to(dtype).cpu().contiguous()


def make_checkpoint(
    out_dir: str | os.PathLike[str],
    variant: str = "tiny",
    *,
    full_size: bool = False,
    shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    language_overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint in the official hub layout; returns its directory.

    ``device`` draws the random values there: on a GPU full-size Small (16 B weights) takes seconds
    instead of minutes. The values differ from a CPU draw with the same seed. ``language_overrides``
    changes ``language_config`` entries (sizes a test needs)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = official_config(variant, full_size=full_size)
    language = config["language_config"]
    language.update(language_overrides or {})
    config["projector_config"]["n_embed"] = language["hidden_size"]
    write_test_tokenizer(out, vocab_size=int(language["vocab_size"]), layout="small" if variant == "small" else "tiny")
    # Like the published configs, bos/eos in config.json name the tokenizer's ids.
    vocab = Tokenizer.from_file(str(out / "tokenizer.json"))
    language["bos_token_id"] = vocab.token_to_id(BOS_TOKEN)
    language["eos_token_id"] = vocab.token_to_id(EOS_TOKEN)
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (out / "processor_config.json").write_text(
        json.dumps(PROCESSOR_CONFIG, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    shapes = official_tensor_shapes(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total_bytes = 0
    # The hub names shards with a six-digit total, e.g. model-00001-of-000001.safetensors.
    plan = _shard_plan(shapes, shards)
    for index, keys in enumerate(plan, start=1):
        name = f"model-{index:05d}-of-{len(plan):06d}.safetensors"
        tensors = dict(_iter_shard_tensors(keys, shapes, generator, dtype))
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    index_doc = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.testing", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official layout")
    make.add_argument("out", help="output directory")
    make.add_argument("--variant", choices=VARIANTS, default="tiny")
    make.add_argument("--full-size", action="store_true", help="real dimensions (Tiny: 6.7 GB in bf16)")
    make.add_argument("--shards", type=int, default=1)
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--device", default="cpu", help="where the random values are drawn (cuda: much faster)")
    args = parser.parse_args(argv)
    path = make_checkpoint(
        args.out, args.variant, full_size=args.full_size, shards=args.shards, seed=args.seed, device=args.device
    )
    count = sum(
        math.prod(s) for s in official_tensor_shapes(official_config(args.variant, full_size=args.full_size)).values()
    )
    print(json.dumps({"path": str(path), "variant": args.variant, "parameters": count}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
