"""GPU memory budgets: the placement planner, moving a model to a plan, and the hybrid forward."""

from __future__ import annotations

import pytest
import torch

from model.loading import UNQUANTIZED_MODULES, ModelLoadError, load_model, plan_before_loading
from model.modeling import DeepseekVL2ForCausalLM
from model.placement import (
    GIB,
    MIB,
    PlacementError,
    apply_placement,
    compute_share_on_cpu,
    cpu_share,
    kv_cache_bytes,
    model_costs,
    parse_size,
    plan_placement,
    routed_group_layer,
)
from model.processing import Message
from model.testing import VARIANTS

from .test_model_forward import _gradient_image


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GiB", 8 * GIB), ("8", 8 * GIB), ("7.5GB", 7_500_000_000), ("8000MiB", 8000 * MIB), (" 6 gib ", 6 * GIB)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_rejects_nonsense_with_an_example():
    with pytest.raises(ValueError, match="8GiB"):
        parse_size("eight gigs")


def test_routed_group_is_the_router_and_the_routed_experts_only():
    assert routed_group_layer("language.model.layers.3.mlp.gate.weight") == 3
    assert routed_group_layer("language.model.layers.3.mlp.gate.e_score_correction_bias") == 3
    assert routed_group_layer("language.model.layers.12.mlp.experts.63.down_proj.weight") == 12
    assert routed_group_layer("language.model.layers.3.mlp.shared_experts.up_proj.weight") is None
    assert routed_group_layer("language.model.layers.0.mlp.gate_proj.weight") is None  # dense layer
    assert routed_group_layer("language.model.layers.3.self_attn.q_proj.weight") is None


GROUPS = {layer: 100 * MIB for layer in range(1, 27)}  # 26 MoE layers after one dense layer


@pytest.mark.parametrize("budget_mib", [1000, 1500, 2000, 2999, 3000, 5000])
def test_plan_fits_the_budget_with_the_fewest_groups_offloaded(budget_mib):
    resident, reserve = 500 * MIB, 500 * MIB
    plan = plan_placement(resident, GROUPS, budget_mib * MIB, reserve)
    assert plan.gpu_weight_bytes + plan.reserve_bytes <= plan.budget_bytes
    assert set(plan.cpu_layers) | set(plan.gpu_layers) == set(GROUPS)
    assert not set(plan.cpu_layers) & set(plan.gpu_layers)
    if plan.cpu_layers:  # one group fewer on the CPU would not fit
        assert plan.gpu_weight_bytes + GROUPS[plan.cpu_layers[-1]] + reserve > plan.budget_bytes
        # counted from the first MoE layer up, like llama.cpp's --n-cpu-moe
        assert plan.cpu_layers == tuple(range(1, 1 + len(plan.cpu_layers)))
    assert plan.offloads == (budget_mib < 3600)
    assert plan.cpu_bytes + plan.gpu_weight_bytes == resident + sum(GROUPS.values())


def test_plan_refuses_a_budget_below_the_resident_part_and_says_what_is_needed():
    with pytest.raises(PlacementError, match=r"1\.50 GiB of non-expert weights.*--gpu-memory"):
        plan_placement(int(1.5 * GIB), GROUPS, 2 * GIB, GIB)


def test_plan_describes_itself():
    text = plan_placement(500 * MIB, GROUPS, 2 * GIB, 500 * MIB).describe()
    assert "MoE layers" in text and "on the CPU" in text and "GPU budget 2.0 GiB" in text


def test_kv_reserve_follows_the_attention_kind(checkpoints):
    from model.configuration import load_official_config

    tiny = load_official_config(checkpoints["tiny"]).text_config
    small = load_official_config(checkpoints["small"]).text_config
    assert kv_cache_bytes(tiny, 10) == tiny.num_hidden_layers * 2 * tiny.num_attention_heads * tiny.head_dim * 2 * 10
    assert kv_cache_bytes(small, 10) == small.num_hidden_layers * (small.kv_lora_rank + small.qk_rope_head_dim) * 2 * 10


def _half_offloading_plan(model) -> object:
    resident, groups = model_costs(model)
    half = sum(sorted(groups.values())[: len(groups) // 2])
    budget = resident + sum(groups.values()) - half + GIB
    plan = plan_placement(resident, groups, budget, GIB)
    assert 0 < len(plan.cpu_layers) < len(groups)
    return plan


def test_moving_to_a_plan_never_splits_a_router_from_its_experts(checkpoints):
    # The meta device stands in for the GPU: two distinct devices, no GPU needed.
    loaded = load_model(checkpoints["small"], device="cpu", dtype="fp32")
    model = loaded.model
    plan = _half_offloading_plan(model)
    apply_placement(model, plan, gpu="meta")
    for name, param in model.named_parameters():
        layer = routed_group_layer(name)
        expected = "cpu" if layer in plan.cpu_layers else "meta"
        assert param.device.type == expected, name
    for index, layer in enumerate(model.language.model.layers):
        if hasattr(layer.mlp, "experts"):
            devices = {p.device for p in [*layer.mlp.gate.parameters(), *layer.mlp.experts.parameters()]}
            assert len(devices) == 1, f"layer {index} split across {devices}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_hybrid_placement_gives_the_single_device_output(variant, checkpoints):
    reference = load_model(checkpoints[variant], device="cpu", dtype="fp32")
    placed = load_model(checkpoints[variant], device="cpu", dtype="fp32")
    plan = _half_offloading_plan(placed.model)
    apply_placement(placed.model, plan, gpu="cpu")  # same device here: the bridging code path runs
    conversation = [Message("user", "<|ref|>the blue corner<|/ref|>", [_gradient_image(320, 240)])]
    inputs = reference.processor(conversation)
    settings = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False,
                "pad_token_id": reference.processor.special.pad}  # fmt: skip
    with torch.no_grad():
        expected_logits = reference.model(**inputs).logits
        expected_tokens = reference.model.generate(**inputs, **settings)
        logits = placed.model(**inputs).logits
        tokens = placed.model.generate(**inputs, **settings)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    layers = placed.model.language.model.layers
    for layer in plan.cpu_layers:  # the offloaded groups were entered through their device bridge
        for part in (layers[layer].mlp.gate, layers[layer].mlp.experts):
            assert hasattr(part, "_caller_device")


def test_hybrid_placement_of_a_4bit_model_matches_the_unplaced_one(checkpoints):
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    placed = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    plan = _half_offloading_plan(placed.model)
    apply_placement(placed.model, plan, gpu="cpu")
    inputs = reference.processor([Message("user", "Describe <image>", [_gradient_image(200, 300)])])
    with torch.no_grad():
        torch.testing.assert_close(placed.model(**inputs).logits, reference.model(**inputs).logits, rtol=0, atol=0)


def test_a_4bit_models_cpu_share_is_unpacked_and_still_gives_the_quantized_output(checkpoints):
    # bitsandbytes has no fused 4-bit CPU kernel in a CUDA process: the share becomes plain linears
    # holding the 4-bit values, so the answer stays the quantized model's.
    reference = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    placed = load_model(checkpoints["tiny"], device="cpu", dtype="bf16", quantization="4bit")
    plan = _half_offloading_plan(placed.model)
    apply_placement(placed.model, plan, gpu="cpu")
    compute = compute_share_on_cpu(placed.model, plan, torch.bfloat16)
    share = cpu_share(placed.model, plan)
    assert not [m for m in share.modules() if type(m).__name__ == "Linear4bit"]
    linears = [m for m in share.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert compute is not None and "decode" in compute.describe()
    layers = placed.model.language.model.layers
    kept_4bit = [layers[i].mlp.experts for i in range(len(layers)) if i not in plan.cpu_layers and i > 0]
    assert any(type(m).__name__ == "Linear4bit" for experts in kept_4bit for m in experts.modules())
    inputs = reference.processor([Message("user", "Describe <image>", [_gradient_image(200, 300)])])
    outputs = {}
    with torch.inference_mode():
        for name, model in (("reference", reference.model), ("placed", placed.model)):
            cache = model.new_cache()
            prompt = model(**inputs, cache=cache, use_cache=True).logits
            token = reference.processor.special.bos  # the same next token for both: one decode step
            step = model.language(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits
            outputs[name] = (prompt.float(), step.float())
    for got, expected in zip(outputs["placed"], outputs["reference"], strict=True):
        assert ((got - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_sizes_estimated_before_loading_match_the_loaded_model(quantization, checkpoints):
    loaded = load_model(checkpoints["small"], device="cpu", dtype="bf16", quantization=quantization)
    exact_resident, exact_groups = model_costs(loaded.model)
    with torch.device("meta"):
        skeleton = DeepseekVL2ForCausalLM(loaded.model.config).to(torch.bfloat16)
    resident, groups = model_costs(skeleton, quantization, tuple(UNQUANTIZED_MODULES))
    assert groups.keys() == exact_groups.keys()
    assert resident == pytest.approx(exact_resident, rel=0.06)
    for layer, size in groups.items():
        assert size == pytest.approx(exact_groups[layer], rel=0.06)
    plan = plan_before_loading(loaded.model.config, 2 * GIB, torch.bfloat16, quantization)
    assert not plan.offloads  # the small test checkpoint fits easily


def test_gpu_memory_is_refused_for_the_cpu(checkpoints):
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(checkpoints["tiny"], device="cpu", gpu_memory="8GiB")
