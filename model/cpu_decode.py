"""A whole decode step of Tiny's language model in three compiled calls per layer (CPU).

With only the one-row kernels of ``model/cpu_kernels.py``, a step of full-size Tiny in bf16 took
80-90 ms, of which 17-24 ms was outside the kernels: transformers' decoder runs about 1,500 small
eager operations a step (norms, rotary embedding, router, residual adds, reshapes, the mask;
counted with ``torch.profiler``) around 84 compiled calls, each paying dynamo's guard checks.
:class:`TinyDecodeStep` runs the same arithmetic as that decoder, for one token of one sequence,
as a handful of compiled graphs per layer that each do a whole stage:

1. query/key/value products and rotary embedding;
2. (the cache stores the new key and value: Python, as any cache class may be given)
3. attention over the cache, output product, residual add, post-attention norm and, in MoE
   layers, the router's softmax and top-k;
4. (Python looks up the chosen experts)
5. the routed and shared experts (or the dense MLP), the residual add and the next norm.

Intermediate results are rounded to the activations' dtype where the stock decoder rounds them,
and the compiled graphs are checked against the stock decoder when the model loads, so answers do
not change. Steps it does not cover (several sequences, a token on another device, outputs of
hidden states or attentions, steps outside ``inference_mode``) go through the stock decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cpu_kernels import (
    CpuLinear,
    _one_query_attention,
    _one_row_product,
    _one_row_swiglu,
    _routed_one_row,
    describe_failure,
    is_plain_swiglu,
    swiglu_weights,
)
from .experts import RoutedExperts

logger = logging.getLogger(__name__)


def _rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' RMSNorm: normalize in fp32, round, then scale."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(hidden.dtype)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on ``x`` [heads, head_dim] with ``cos``/``sin`` [head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def _attention_inputs(
    x: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 1: query, key and value of the normed token ``x``, each [1, heads, 1, head_dim]."""
    head_dim = cos.shape[-1]
    query = _one_row_product(x, w_q).view(-1, head_dim)
    key = _one_row_product(x, w_k).view(-1, head_dim)
    value = _one_row_product(x, w_v).view(-1, head_dim)
    query, key = _rotary(query, cos, sin), _rotary(key, cos, sin)
    return query[None, :, None], key[None, :, None], value[None, :, None]


def _attention_output(
    hidden: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    allowed: torch.Tensor,
    w_o: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 3 of a dense layer: the residual stream after attention and its normed copy."""
    attended = _one_query_attention(query, keys, values, scale, allowed).reshape(-1)
    hidden = hidden + _one_row_product(attended, w_o)
    return hidden, _rms_norm(hidden, norm, eps)


def _attention_output_routed(
    router: torch.Tensor, top_k: int, routed_scaling: float, *attention: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 3 of an MoE layer: :func:`_attention_output` (``attention`` are its arguments), plus
    the greedy softmax router's choice (fp32 logits, as transformers' ``DeepseekOcr2TextTopkRouter``)."""
    hidden, x = _attention_output(*attention)
    # A reduction, not F.linear: Inductor would call an external fp32 GEMV for it (1.1 ms a step).
    scores = _one_row_product(x.float(), router.float()).softmax(-1)
    weights, experts = torch.topk(scores, k=top_k, sorted=False)
    return hidden, x, weights * routed_scaling, experts


def _moe_output(
    hidden: torch.Tensor,
    x: torch.Tensor,
    routing_weights: torch.Tensor,
    routed: list[torch.Tensor],
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    next_norm: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 5 of an MoE layer: chosen routed experts plus the shared experts, added to ``hidden``;
    also the next norm's output (the next layer's input norm, or the final norm)."""
    hidden = hidden + (_routed_one_row(x, routing_weights, routed) + _one_row_swiglu(x, gate, up, down))
    return hidden, _rms_norm(hidden, next_norm, eps)


def _mlp_output(
    hidden: torch.Tensor,
    x: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    next_norm: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 5 of a dense layer."""
    hidden = hidden + _one_row_swiglu(x, gate, up, down)
    return hidden, _rms_norm(hidden, next_norm, eps)


@dataclass(frozen=True)
class StepGraphs:
    attention_inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    attention_output: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    attention_output_routed: Callable[..., tuple[torch.Tensor, ...]]
    moe_output: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    mlp_output: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    logits: Callable[..., torch.Tensor]


_graphs: StepGraphs | None = None


def step_graphs() -> StepGraphs:
    """The stages compiled (dynamic shapes, once per process; Inductor compiles on first call)."""
    global _graphs
    if _graphs is None:
        stages = (
            _attention_inputs,
            _attention_output,
            _attention_output_routed,
            _moe_output,
            _mlp_output,
            _one_row_product,
        )
        _graphs = StepGraphs(*(torch.compile(stage, dynamic=True) for stage in stages))
    return _graphs


def _weight(linear: nn.Module) -> torch.Tensor:
    return linear.weight.detach()  # as swiglu_weights: one graph for every layer


def supports(language: nn.Module) -> str | None:
    """``None`` when :class:`TinyDecodeStep` can run ``language``, else why not."""
    if not hasattr(type(language), "decode_step"):  # VL2TinyForCausalLM declares it
        return "not a Tiny-style language model"
    layers = language.model.layers
    # CpuLinear: a full-precision weight on the CPU (bitsandbytes' layers are other nn.Linear kinds).
    if not isinstance(language.lm_head, CpuLinear):
        return "lm_head is not a plain linear on the CPU"
    if any(p.device.type != "cpu" for p in language.parameters()):
        return "weights not all on the CPU"
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not all(isinstance(p, CpuLinear) and p.bias is None for p in projections):
            return "attention is not four plain linears (quantized?)"
        if attention.num_key_value_groups != 1:
            return "grouped-query attention"
        experts = getattr(mlp, "experts", None)
        if experts is None:
            if not is_plain_swiglu(mlp):
                return "dense MLP is not a plain SwiGLU"
            continue
        gate = mlp.gate
        if not isinstance(experts, RoutedExperts) or not all(is_plain_swiglu(e) for e in experts):
            return "routed experts are not plain SwiGLUs (quantized?)"
        if getattr(gate, "topk_method", None) != "greedy" or not is_plain_swiglu(mlp.shared_experts):
            return "router or shared experts not supported"
    return None


class TinyDecodeStep:
    """Runs one decode step of ``language`` (a ``VL2TinyForCausalLM``) through :class:`StepGraphs`."""

    def __init__(self, language: nn.Module, graphs: StepGraphs) -> None:
        self.language = language
        self.graphs = graphs

    @staticmethod
    def applies(tokens: torch.Tensor | None, cache, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        return (
            tokens is not None
            and tokens.shape[:2] == (1, 1)
            and tokens.device.type == "cpu"
            and cache is not None
            and torch.is_inference_mode_enabled()
            and (attention_mask is None or attention_mask.dim() == 2)
            and not any(kwargs.get(name) for name in ("output_attentions", "output_hidden_states"))
        )

    def __call__(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        cache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> CausalLMOutputWithPast:
        graphs, text = self.graphs, self.language.model
        hidden = text.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cached = cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.full((1, 1), cached, dtype=torch.long)
        cos, sin = text.rotary_emb(hidden, position_ids)
        cos, sin = cos.reshape(-1), sin.reshape(-1)
        length = cached + 1
        if attention_mask is None:
            allowed = torch.ones(1, 1, 1, length, dtype=torch.bool)
        else:  # padding (a 2-D mask as ``generate`` keeps it), already covering this token
            allowed = attention_mask[:, -length:].bool().view(1, 1, 1, -1)
        # Each norm's output is computed by the stage before it and passed on materialized: fused
        # into the products that read it, Inductor recomputes it for every output row (measured
        # 45 % slower on ``lm_head``).
        x = text.layers[0].input_layernorm(hidden).reshape(-1)
        hidden = hidden.reshape(-1)
        layers = text.layers
        for index, layer in enumerate(layers):
            attention, mlp = layer.self_attn, layer.mlp
            next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else text.norm
            query, key, value = graphs.attention_inputs(
                x, _weight(attention.q_proj), _weight(attention.k_proj), _weight(attention.v_proj), cos, sin
            )
            keys, values = cache.update(key, value, index)
            post_norm = layer.post_attention_layernorm
            stage3 = (hidden, query, keys, values, attention.scaling, allowed, _weight(attention.o_proj))
            stage3 += (post_norm.weight.detach(), post_norm.variance_epsilon)
            stage5_norm = (next_norm.weight.detach(), next_norm.variance_epsilon)
            if getattr(mlp, "experts", None) is None:
                hidden, x = graphs.attention_output(*stage3)
                hidden, x = graphs.mlp_output(hidden, x, *swiglu_weights(mlp), *stage5_norm)
                continue
            gate = mlp.gate
            hidden, x, routing_weights, chosen = graphs.attention_output_routed(
                gate.weight.detach(), gate.top_k, gate.routed_scaling_factor, *stage3
            )
            routed = [w for expert in chosen.tolist() for w in swiglu_weights(mlp.experts[expert])]
            shared = swiglu_weights(mlp.shared_experts)
            hidden, x = graphs.moe_output(hidden, x, routing_weights, routed, *shared, *stage5_norm)
        logits = graphs.logits(x, _weight(self.language.lm_head))
        return CausalLMOutputWithPast(logits=logits.view(1, 1, -1), cache=cache)


def warm_up(language: nn.Module, step: TinyDecodeStep) -> None:
    """Compile the stages now, with the model's real shapes, and check one step against the
    stock decoder (from the same cache; both steps write the same position)."""
    from .kv_cache import growing_cache

    start = torch.tensor([[0, 1, 2]])
    # Without duck sizing: the warm-up's cache length could equal another size (a small model's
    # head count) and the graphs would then be specialized on that equality, and compiled again
    # in the middle of the first answer.
    with torch.inference_mode(), fx_config.patch(use_duck_shape=False):
        cache = growing_cache(language.config, getattr(language, "cache_values_dim_major", False))
        language(input_ids=start, cache=cache, use_cache=True)
        token = torch.tensor([[3]])
        got = step(token, None, cache, None, None).logits
        cache.crop(-1)  # drop the fast step's token; the stock step writes it again
        saved, language.decode_step = language.decode_step, None
        try:
            expected = language(input_ids=token, cache=cache, use_cache=True).logits
        finally:
            language.decode_step = saved
    tolerance = 0.02 if expected.dtype != torch.float32 else 1e-4
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def use_decode_step(language: nn.Module) -> str | None:
    """Give ``language`` the compiled whole-step decoder where it applies. Returns a line for the
    compute summary: "whole steps compiled", or why compiling or checking it failed (the stock
    decoder stays); ``None`` where it does not apply (see :func:`supports`)."""
    if supports(language) is not None:
        return None
    step = TinyDecodeStep(language, step_graphs())
    language.decode_step = step
    try:
        warm_up(language, step)
    except Exception as exc:  # compiler missing, numerical mismatch, ...: keep the stock decoder
        language.decode_step = None
        failure = describe_failure(exc)
        logger.warning("whole-step CPU decode unavailable (%s)", failure)
        return f"whole steps failed ({failure})"
    return "whole steps compiled"
