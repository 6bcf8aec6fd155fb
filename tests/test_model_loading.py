"""Loading the official checkpoint layout: configs, renames, parameter counts, exact weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from model.configuration import (
    ConfigError,
    VL2BaseTextConfig,
    VL2SmallTextConfig,
    VL2TinyTextConfig,
    config_from_official,
)
from model.loading import ModelLoadError, load_model
from model.modeling import DeepseekVL2ForCausalLM
from model.testing import VARIANTS, official_config, official_tensor_shapes

SPEC_TOTALS = {"tiny": 3_370_501_440, "small": 16_148_349_504, "base": 27_480_134_248}


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensors[key] = f.get_tensor(key)
    return tensors


def official_to_ours(key: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mapping, restated independently of model/modeling.py's conversion list."""
    if not key.startswith("vision."):
        return {key: tensor}
    name = key.removeprefix("vision.")
    if name == "pos_embed":
        return {"vision.embeddings.position_embedding.weight": tensor[0]}
    if name.startswith("patch_embed.proj."):
        return {"vision.embeddings.patch_embedding." + name.split(".")[-1]: tensor}
    if name.startswith("norm."):
        return {"vision.post_layernorm." + name.split(".")[-1]: tensor}
    parts = name.split(".")
    layer, rest = parts[1], ".".join(parts[2:])
    prefix = f"vision.encoder.layers.{layer}."
    if rest.startswith("attn.qkv."):
        q, k, v = tensor.chunk(3, dim=0)
        suffix = parts[-1]
        return {f"{prefix}self_attn.{p}_proj.{suffix}": t for p, t in zip("qkv", (q, k, v), strict=True)}
    renames = {
        "norm1.": "layer_norm1.",
        "norm2.": "layer_norm2.",
        "attn.proj.": "self_attn.out_proj.",
        "mlp.": "mlp.",
    }
    for old, new in renames.items():
        if rest.startswith(old):
            return {prefix + new + rest.removeprefix(old): tensor}
    raise AssertionError(f"unmapped key {key}")


def test_small_language_configs_resolve_official_defaults():
    base = config_from_official(official_config("base", full_size=True)).text_config
    assert isinstance(base, VL2BaseTextConfig)
    # base's published language_config omits these; the official defaults apply, not transformers'.
    assert (base.num_hidden_layers, base.num_attention_heads, base.num_key_value_heads) == (30, 32, 32)
    assert (base.kv_lora_rank, base.qk_nope_head_dim, base.qk_rope_head_dim, base.v_head_dim) == (
        512,
        128,
        64,
        128,
    )
    assert (base.n_group, base.topk_group, base.routed_scaling_factor, base.norm_topk_prob) == (
        1,
        1,
        2.0,
        True,
    )
    assert base.q_lora_rank is None and base.num_mtp_layers == 0 and base.vocab_size == 129280
    tiny = config_from_official(official_config("tiny", full_size=True)).text_config
    assert isinstance(tiny, VL2TinyTextConfig)
    assert tiny.head_dim == 128 and tiny.mlp_layer_types == ["dense"] + ["sparse"] * 11
    assert tiny.rope_parameters["rope_theta"] == 10000.0
    small = config_from_official(official_config("small", full_size=True)).text_config
    assert isinstance(small, VL2SmallTextConfig)
    assert small.vocab_size == 102400 and small.num_key_value_heads == 16 and small.topk_method == "greedy"


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_at_full_size(variant):
    raw = official_config(variant, full_size=True)
    shapes = official_tensor_shapes(raw)
    assert sum(math.prod(s) for s in shapes.values()) == SPEC_TOTALS[variant]
    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(config_from_official(raw))
    ours = sum(p.numel() for p in model.parameters())
    # base's router correction bias is a buffer in transformers; the pool head is stored but unused.
    ours += sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    pool_head = sum(math.prod(s) for k, s in shapes.items() if ".attn_pool." in k)
    assert ours + pool_head == SPEC_TOTALS[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_weights_land_exactly(variant, checkpoints, loaded_fp32):
    model = loaded_fp32[variant].model
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    raw = read_checkpoint(checkpoints[variant])
    seen = set()
    for key, tensor in raw.items():
        if ".attn_pool." in key:
            continue
        for ours, expected in official_to_ours(key, tensor).items():
            assert ours in state, f"{key} → {ours} missing"
            torch.testing.assert_close(state[ours].float(), expected.float(), rtol=0, atol=0, msg=key)
            seen.add(ours)
    unused = {n for n in state if n not in seen and not n.endswith(("inv_freq", "original_inv_freq"))}
    unused = {n for n in unused if "rotary_emb" not in n and "position_ids" not in n}
    assert not unused, f"parameters with no checkpoint tensor: {sorted(unused)[:5]}"


def test_bf16_load_keeps_router_in_fp32(checkpoints):
    loaded = load_model(checkpoints["small"], device="cpu", dtype="bf16")
    layer = loaded.model.language.model.layers[1]
    assert layer.mlp.gate.weight.dtype == torch.float32
    assert layer.mlp.experts[0].gate_proj.weight.dtype == torch.bfloat16
    assert loaded.model.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert loaded.info.variant == "small" and loaded.info.quantization is None


def test_from_pretrained_class_methods_read_the_official_layout(checkpoints, loaded_fp32):
    from model.processing import DeepseekVL2Processor

    model, info = DeepseekVL2ForCausalLM.from_pretrained(checkpoints["base"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.dtype == torch.bfloat16  # the published torch_dtype
    reference = loaded_fp32["base"].model.language.lm_head.weight
    torch.testing.assert_close(model.language.lm_head.weight.float(), reference, rtol=0, atol=0)
    processor = DeepseekVL2Processor.from_pretrained(checkpoints["base"])
    assert processor.special == loaded_fp32["base"].processor.special


def test_loader_reports_clear_errors(tmp_path, checkpoints, monkeypatch):
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path, device="cpu")
    with pytest.raises(ModelLoadError, match="no checkpoint folder"):
        load_model(tmp_path / "missing" / "deep" / "path", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"--model DIR"):
        load_model("deepseek-ai/this-model-is-not-cached", device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    raw = json.loads((checkpoints["tiny"] / "config.json").read_text())
    del raw["vision_config"]["width"]
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="width"):
        load_model(broken, device="cpu")


def test_unsupported_architecture_is_refused():
    raw = official_config("small")
    raw["language_config"]["q_lora_rank"] = 64
    with pytest.raises(ConfigError, match="q_lora_rank"):
        config_from_official(raw)
    raw = official_config("tiny")
    raw["vision_config"]["model_name"] = "clip_vit_large"
    with pytest.raises(ConfigError, match="SigLIP"):
        config_from_official(raw)


def test_missing_tensor_is_an_error(tmp_path, checkpoints):
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / "tiny"
    shutil.copytree(checkpoints["tiny"], copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["view_seperator"]
    tensors = {}
    with safe_open(str(copy / shard), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            if key != "view_seperator":
                tensors[key] = f.get_tensor(key)
    save_file(tensors, str(copy / shard), metadata={"format": "pt"})
    del index["weight_map"]["view_seperator"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="view_seperator"):
        load_model(copy, device="cpu", dtype="fp32")


def test_config_round_trips_through_to_dict():
    from model.configuration import DeepseekVL2Config

    for variant in VARIANTS:
        config = config_from_official(official_config(variant, full_size=True))
        again = DeepseekVL2Config(**config.to_dict())
        assert type(again.text_config) is type(config.text_config)
        assert again.text_config.to_dict() == config.text_config.to_dict()


def test_missing_tokenizer_fails_fast_with_a_clear_message(tmp_path, checkpoints):
    import shutil

    copy = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoints["tiny"], copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load_model(copy, device="cpu")


def test_the_attention_implementation_asked_for_reaches_vision_and_language(checkpoints):
    loaded = load_model(checkpoints["small"], device="cpu", dtype="fp32", attn_implementation="eager")
    model = loaded.model
    assert model.vision.config._attn_implementation == "eager"
    assert model.language.config._attn_implementation == "eager"
