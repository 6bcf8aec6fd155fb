"""Turn the official DeepSeek-VL2 ``config.json`` into transformers 5 configs.

The hub configs are not loadable by transformers as they stand: their ``model_type`` values
(``deepseek_vl_v2``, ``vision``, ``mlp_projector``) are not registered, the language block relies on
the *official* code's defaults for keys it omits (base omits the layer count, heads and MLA dims),
and transformers 5's DeepSeek configs have different defaults and a strict schema (Tiny's
``kv_lora_rank: null`` is rejected). So we resolve every field ourselves and pass each one
explicitly.

Each text config subclasses the transformers config that reproduces that variant but carries its
own ``model_type``. That keeps transformers' stock checkpoint conversion for ``deepseek_v2/v3``
(which packs the per-expert tensors into 3-D parameters) away from our models: we keep the experts
as per-expert ``nn.Linear`` modules with the official names, which is what lets bitsandbytes
quantize them (see ``model/experts.py``).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from transformers import DeepseekV2Config, DeepseekV3Config, PreTrainedConfig, SiglipVisionConfig
from transformers.models.deepseek_ocr2.configuration_deepseek_ocr2 import DeepseekOcr2TextConfig
from transformers.utils import cached_file

_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only",
                    "subfolder", "_from_auto", "_from_pipeline", "_commit_hash", "gguf_file")  # fmt: skip

# Defaults of the official ``DeepseekV2Config`` (the hub configs rely on them for missing keys).
OFFICIAL_LANGUAGE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "routed_scaling_factor": 1.0,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "gready",  # sic: the official default is misspelt; every hub config overrides it
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "use_mla": True,
}

# Defaults of the official vision/projector config classes. The vision defaults describe
# SigLIP-Large, so a config that omits the SO400M keys must not silently fall back to them;
# we require the keys that decide tensor shapes.
OFFICIAL_VISION_DEFAULTS: dict[str, Any] = {"image_size": 384, "heads": 16}
REQUIRED_VISION_KEYS = ("width", "layers", "patch_size", "mlp_ratio")
OFFICIAL_PROJECTOR_DEFAULTS: dict[str, Any] = {
    "projector_type": "downsample_mlp_gelu",
    "input_dim": 1152,
    "depth": 2,
    "mlp_ratio": 1,
    "downsample_ratio": 2,
    "token_pooling": False,
}


class ConfigError(ValueError):
    """The checkpoint's config describes something this runtime does not implement."""


class VL2TinyTextConfig(DeepseekOcr2TextConfig):
    """Tiny: standard multi-head attention (rotate-half RoPE) with DeepSeek MoE."""

    model_type = "deepseek_vl_v2_text_mha"


class VL2SmallTextConfig(DeepseekV2Config):
    """Small: multi-head latent attention with the softmax greedy router."""

    model_type = "deepseek_vl_v2_text_mla"


class VL2BaseTextConfig(DeepseekV3Config):
    """base: multi-head latent attention with the sigmoid ``noaux_tc`` router (weights sum to 2.0)."""

    model_type = "deepseek_vl_v2_text_mla_noaux"


TextConfig = VL2TinyTextConfig | VL2SmallTextConfig | VL2BaseTextConfig


class DeepseekVL2Config(PreTrainedConfig):
    """Top-level config: SigLIP tower, 2×2 down-sampling MLP projector, tile layout, language model."""

    model_type = "deepseek_vl_v2"

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_input_dim: int = 1152
    projector_depth: int = 2
    projector_mlp_ratio: int = 1
    downsample_ratio: int = 2
    candidate_resolutions: list | None = None
    tile_tag: str = "2D"
    global_view_pos: str = "head"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = SiglipVisionConfig(**self.vision_config)
        if isinstance(self.text_config, dict):
            # Our own to_dict() (save_pretrained) carries the transformers form; a hub config, the official one.
            own = {cls.model_type: cls for cls in (VL2TinyTextConfig, VL2SmallTextConfig, VL2BaseTextConfig)}
            kind = own.get(self.text_config.get("model_type"))
            self.text_config = kind(**self.text_config) if kind else text_config_from_official(self.text_config)
        super().__post_init__(**kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        return_unused_kwargs: bool = False,
        **kwargs: Any,
    ) -> DeepseekVL2Config | tuple[DeepseekVL2Config, dict[str, Any]]:
        """Read a published ``config.json`` (hub id or folder), so ``from_pretrained`` works unchanged."""
        download = {k: kwargs.pop(k) for k in _DOWNLOAD_KWARGS if k in kwargs}
        download = {k: v for k, v in download.items() if not k.startswith("_") and k != "gguf_file"}
        config_file = cached_file(pretrained_model_name_or_path, "config.json", **download)
        with open(config_file, encoding="utf-8") as f:
            config = config_from_official(json.load(f))
        return (config, kwargs) if return_unused_kwargs else config

    def get_text_config(self, *args: Any, **kwargs: Any) -> PreTrainedConfig:
        return self.text_config

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size


def resolve_language_config(language_config: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys a hub ``language_config`` omits with the official code's defaults."""
    resolved = dict(OFFICIAL_LANGUAGE_DEFAULTS)
    resolved.update({k: v for k, v in language_config.items() if not k.startswith("_")})
    return resolved


def _rope_parameters(resolved: dict[str, Any]) -> dict[str, Any]:
    if resolved.get("rope_scaling"):
        raise ConfigError(
            f"rope_scaling={resolved['rope_scaling']!r} is not used by any DeepSeek-VL2 checkpoint "
            "and is not implemented here."
        )
    return {"rope_type": "default", "rope_theta": float(resolved.get("rope_theta") or 10000.0)}


def _layer_is_moe(layer: int, resolved: dict[str, Any]) -> bool:
    return (
        resolved["n_routed_experts"] is not None
        and layer >= resolved["first_k_dense_replace"]
        and layer % resolved["moe_layer_freq"] == 0
    )


def text_config_from_official(language_config: dict[str, Any]) -> TextConfig:
    """Build the transformers config for the checkpoint's language model, every field explicit."""
    r = resolve_language_config(language_config)
    if r["n_routed_experts"] is None:
        raise ConfigError("language_config has no n_routed_experts: only the MoE DeepSeek-VL2 models are supported")
    if r["q_lora_rank"] is not None and r["use_mla"]:
        raise ConfigError("q_lora_rank is set, but no DeepSeek-VL2 checkpoint uses query LoRA; not implemented")
    common: dict[str, Any] = {
        "vocab_size": r["vocab_size"],
        "hidden_size": r["hidden_size"],
        "intermediate_size": r["intermediate_size"],
        "moe_intermediate_size": r["moe_intermediate_size"],
        "num_hidden_layers": r["num_hidden_layers"],
        "num_attention_heads": r["num_attention_heads"],
        "n_shared_experts": r["n_shared_experts"] or 0,
        "n_routed_experts": r["n_routed_experts"],
        "num_experts_per_tok": r["num_experts_per_tok"],
        "routed_scaling_factor": float(r["routed_scaling_factor"]),
        "n_group": r["n_group"] or 1,
        "topk_group": r["topk_group"] or 1,
        "hidden_act": r["hidden_act"],
        "max_position_embeddings": r["max_position_embeddings"],
        "initializer_range": r["initializer_range"],
        "rms_norm_eps": r["rms_norm_eps"],
        "bos_token_id": r["bos_token_id"],
        "eos_token_id": r["eos_token_id"],
        "pad_token_id": r["pad_token_id"],
        "tie_word_embeddings": bool(r["tie_word_embeddings"]),
        "rope_parameters": _rope_parameters(r),
        "attention_bias": bool(r["attention_bias"]),
        "attention_dropout": float(r["attention_dropout"]),
    }
    if not r["use_mla"]:
        if r["topk_method"] != "greedy" or r["scoring_func"] != "softmax":
            raise ConfigError("the standard-attention (Tiny) model is only known with the softmax greedy router")
        layer_types = ["sparse" if _layer_is_moe(i, r) else "dense" for i in range(r["num_hidden_layers"])]
        return VL2TinyTextConfig(
            **common,
            num_key_value_heads=r["num_key_value_heads"],
            topk_method="greedy",
            mlp_layer_types=layer_types,
        )
    if r["moe_layer_freq"] != 1:
        raise ConfigError("moe_layer_freq != 1 is not used by DeepSeek-VL2 and not supported for MLA models")
    mla = {
        "first_k_dense_replace": r["first_k_dense_replace"],
        "kv_lora_rank": r["kv_lora_rank"],
        "q_lora_rank": None,
        "qk_nope_head_dim": r["qk_nope_head_dim"],
        "qk_rope_head_dim": r["qk_rope_head_dim"],
        "v_head_dim": r["v_head_dim"],
        # MLA has no grouped keys; transformers uses this for num_key_value_groups, so it must equal heads.
        "num_key_value_heads": r["num_attention_heads"],
        "norm_topk_prob": bool(r["norm_topk_prob"]),
    }
    if r["topk_method"] == "noaux_tc":
        if r["scoring_func"] != "sigmoid":
            raise ConfigError("topk_method noaux_tc is only implemented with scoring_func sigmoid")
        return VL2BaseTextConfig(**common, **mla, rope_interleave=True, num_mtp_layers=0)
    if r["topk_method"] not in ("greedy", "group_limited_greedy") or r["scoring_func"] != "softmax":
        raise ConfigError(f"unsupported router: topk_method={r['topk_method']!r}, scoring_func={r['scoring_func']!r}")
    if r["norm_topk_prob"]:
        raise ConfigError("norm_topk_prob with the softmax router is not used by DeepSeek-VL2 and not supported")
    return VL2SmallTextConfig(**common, **mla, topk_method=r["topk_method"])


def vision_config_from_official(vision_config: dict[str, Any]) -> SiglipVisionConfig:
    name = str(vision_config.get("model_name", "siglip_so400m_patch14_384"))
    if "siglip" not in name:
        raise ConfigError(f"vision model {name!r} is not supported: DeepSeek-VL2 uses SigLIP")
    missing = [k for k in REQUIRED_VISION_KEYS if k not in vision_config]
    if missing:
        raise ConfigError(f"vision_config is missing {missing}; refusing to guess the tower's shape")
    v = {**OFFICIAL_VISION_DEFAULTS, **vision_config}
    width = int(v["width"])
    return SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * float(v["mlp_ratio"])),
        num_hidden_layers=int(v["layers"]),
        num_attention_heads=int(v["heads"]),
        image_size=int(v["image_size"]),
        patch_size=int(v["patch_size"]),
        num_channels=3,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        attention_dropout=0.0,
        vision_use_head=False,
    )


def config_from_official(raw: dict[str, Any]) -> DeepseekVL2Config:
    """Build a :class:`DeepseekVL2Config` from the dict of an official ``config.json``."""
    for key in ("vision_config", "projector_config", "language_config"):
        if key not in raw:
            raise ConfigError(f"config.json has no {key!r}: is this a DeepSeek-VL2 checkpoint?")
    vision = vision_config_from_official(raw["vision_config"])
    projector = {**OFFICIAL_PROJECTOR_DEFAULTS, **raw["projector_config"]}
    text = text_config_from_official(raw["language_config"])
    if projector["projector_type"] != "downsample_mlp_gelu" or projector["token_pooling"]:
        raise ConfigError(f"projector {projector['projector_type']!r} is not the DeepSeek-VL2 projector")
    if int(projector["n_embed"]) != text.hidden_size:
        raise ConfigError("projector n_embed must equal the language model's hidden size")
    if int(projector["input_dim"]) != vision.hidden_size:
        raise ConfigError("projector input_dim must equal the vision width")
    if raw.get("tile_tag", "2D") != "2D" or raw.get("global_view_pos", "head") != "head":
        raise ConfigError("only tile_tag '2D' with the global view at the head is used by DeepSeek-VL2")
    grid = vision.image_size // vision.patch_size
    if math.ceil(grid / int(projector["downsample_ratio"])) * int(projector["downsample_ratio"]) < grid:
        raise ConfigError("inconsistent patch grid and downsample ratio")
    return DeepseekVL2Config(
        vision_config=vision,
        text_config=text,
        projector_input_dim=int(projector["input_dim"]),
        projector_depth=int(projector["depth"]),
        projector_mlp_ratio=int(projector["mlp_ratio"]),
        downsample_ratio=int(projector["downsample_ratio"]),
        candidate_resolutions=[list(map(int, c)) for c in raw.get("candidate_resolutions", [[384, 384]])],
        tile_tag="2D",
        global_view_pos="head",
        dtype=raw.get("torch_dtype", "bfloat16"),
    )


def load_official_config(checkpoint_dir: str | os.PathLike[str]) -> DeepseekVL2Config:
    path = os.path.join(checkpoint_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        return config_from_official(json.load(f))


def variant_name(config: DeepseekVL2Config) -> str:
    """``tiny`` / ``small`` / ``base``-style family name, from the architecture (not from a repo id)."""
    text = config.text_config
    if isinstance(text, VL2TinyTextConfig):
        return "tiny"
    if isinstance(text, VL2BaseTextConfig):
        return "base"
    return "small"
