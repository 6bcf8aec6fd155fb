"""A whole decode step of Tiny's language model in one compiled call per layer (CPU).

Where the weights are bf16 and the chip has AVX512-BF16, ``model/cpu/native.py`` runs the step
instead (one native call, 0.65-0.78x this step's time, paired in the bench); this one covers fp32
weights, NF4 layers and chips without AVX512-BF16.

With only the one-row kernels of ``model/cpu/kernels.py``, a step of full-size Tiny in bf16 took
80-90 ms, of which 17-24 ms was outside the kernels: transformers' decoder runs about 1,500 small
eager operations a step (norms, rotary embedding, router, residual adds, reshapes, the mask;
counted with ``torch.profiler``) around 84 compiled calls, each paying dynamo's guard checks.
:class:`TinyDecodeStep` runs the same arithmetic as that decoder, for one token of one sequence,
as one compiled graph per layer boundary. Each graph does:

1. a layer's MLP (its chosen routed experts and shared experts, or the dense MLP), the residual
   add and the next norm;
2. the next layer's query/key/value products and rotary embedding; it writes the new key and
   value straight into the cache's buffers (``GrowingLayer.extend``, ``model/kv_cache.py``);
3. attention over the cache, the output product, the residual add, the post-attention norm and,
   in MoE layers, the router's softmax and top-k;

or, after the last layer, the final norm and ``lm_head``. Between graphs Python only looks up the
experts the router chose. A step of full-size Tiny is 13 compiled calls; Inductor fuses each
layer's stage into about one kernel. On the 2-core EPYC a step takes 51-63 ms when ``sum`` reads
about 30 GB/s and 39-61 ms when it reads 40-52 GB/s: profiled (``python -m bench.decode_parts
--split``), about four fifths of it is in those kernels, which convert each bf16 weight to fp32
before multiplying and top out near 37 GB/s even with the weights in cache, and the rest is Python
between the graphs, dynamo's guard checks (about 0.15 ms a call) and the graphs' wrappers, all
slowed by caches the weights have just flushed. (Three calls per layer, with the cache written from
Python between them, ran as fast: paired ratio 1.00. Tried and not faster, paired: the whole step
as one graph with each layer's experts stacked and gathered inside it, 1.28x the time and 134 s to
compile; an AVX512-BF16 kernel for a layer's experts called from the graphs, 0.97-1.02x: it reads
1.5x faster alone but splits the fused kernels around it.)

Products with bitsandbytes 4-bit layers (NF4) call the same CPU kernel ``Linear4bit`` calls, as
an external kernel inside the graphs; full-size Tiny NF4 steps took 49.4 ms instead of 54.3
(paired, one process). 8-bit layers keep the per-module decoder.

Intermediate results are rounded to the activations' dtype where the stock decoder rounds them,
and the compiled graphs are checked against the stock decoder when the model loads, so answers do
not change. Steps it does not cover (several sequences, a token on another device, a cache of
another kind, outputs of hidden states or attentions, steps outside ``inference_mode``) go through
the stock decoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..experts import RoutedExperts
from ..kv_cache import GrowingLayer, growing_cache
from .kernels import (
    CpuLinear,
    _one_query_attention,
    _one_row_product,
    _one_row_swiglu,
    _product,
    _routed_one_row,
    describe_failure,
    is_plain_linear,
    is_plain_swiglu,
    packed_4bit,
    product_weight,
    swiglu_weights,
)

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


def _attend(
    hidden: torch.Tensor,
    x: torch.Tensor,
    attention: tuple,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slot: torch.Tensor,
    allowed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention for the normed token ``x``: the residual stream after it and the
    post-attention norm's output. The new key and value are written into the cache's buffers
    (keys ``[1, heads, capacity, head_dim]``, values dimension-major ``[1, heads, head_dim,
    capacity]``) at position ``slot`` (a one-element tensor: a Python int there would be
    specialized, one graph per position); attention reads the buffers' first ``allowed`` tokens."""
    w_q, w_k, w_v, w_o, key_buffer, value_buffer, scale, norm, eps = attention
    head_dim, length = cos.shape[-1], allowed.shape[-1]
    query = _rotary(_product(x, w_q).view(-1, head_dim), cos, sin)
    key = _rotary(_product(x, w_k).view(-1, head_dim), cos, sin)
    key_buffer.index_copy_(2, slot, key.view(1, -1, 1, head_dim))
    value_buffer.index_copy_(3, slot, _product(x, w_v).view(1, -1, head_dim, 1))
    keys, values = key_buffer[:, :, :length], value_buffer[..., :length].transpose(-1, -2)
    attended = _one_query_attention(query[None, :, None], keys, values, scale, allowed).reshape(-1)
    hidden = hidden + _product(attended, w_o)
    return hidden, _rms_norm(hidden, norm, eps)


def _route(x: torch.Tensor, router: torch.Tensor, top_k: int, routed_scaling: float) -> tuple[torch.Tensor, ...]:
    """The greedy softmax router's choice (fp32 logits, as transformers' ``DeepseekOcr2TextTopkRouter``)."""
    # A reduction, not F.linear: Inductor would call an external fp32 GEMV for it (1.1 ms a step).
    scores = _one_row_product(x.float(), router.float()).softmax(-1)
    weights, experts = torch.topk(scores, k=top_k, sorted=False)
    return weights * routed_scaling, experts


def _next_layer(
    hidden: torch.Tensor, x: torch.Tensor, attention: tuple, rotary: tuple, router: tuple | None
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The next layer's attention (``rotary``: cos, sin, slot, allowed), and its router's choice
    where it has experts. ``x`` is returned as well as used: a graph output is materialized, so
    its consumers read it instead of recomputing the norm for every row of a weight (``lm_head``
    ran 45 % slower that way)."""
    hidden, x = _attend(hidden, x, attention, *rotary)
    return hidden, x, None if router is None else _route(x, *router)


def _moe_residual(
    hidden: torch.Tensor, x: torch.Tensor, routing_weights: torch.Tensor, routed: list, shared: tuple
) -> torch.Tensor:
    """An MoE layer's residual stream after its chosen routed experts and its shared experts."""
    return hidden + (_routed_one_row(x, routing_weights, routed) + _one_row_swiglu(x, *shared))


def _first_stage(hidden: torch.Tensor, x: torch.Tensor, attention: tuple, rotary: tuple, router: tuple | None):
    """The first layer's attention (``x``: its input norm's output)."""
    return _next_layer(hidden, x, attention, rotary, router)


def _dense_stage(hidden, x, mlp: tuple, norm: tuple, attention: tuple, rotary: tuple, router: tuple | None):
    """A dense layer's MLP, the next layer's input norm, and that layer's attention."""
    hidden = hidden + _one_row_swiglu(x, *mlp)
    return _next_layer(hidden, _rms_norm(hidden, *norm), attention, rotary, router)


def _moe_stage(hidden, x, routing_weights, routed, shared, norm: tuple, attention: tuple, rotary: tuple, router):
    """An MoE layer's experts, the next layer's input norm, and that layer's attention."""
    hidden = _moe_residual(hidden, x, routing_weights, routed, shared)
    return _next_layer(hidden, _rms_norm(hidden, *norm), attention, rotary, router)


def _logits(hidden: torch.Tensor, norm: tuple, lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The final norm and the logits; the norm's output is returned too, so that it is
    materialized (see :func:`_next_layer`)."""
    x = _rms_norm(hidden, *norm)
    return _one_row_product(x, lm_head), x


def _dense_logits(hidden, x, mlp: tuple, norm: tuple, lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last layer's dense MLP, the final norm and the logits."""
    return _logits(hidden + _one_row_swiglu(x, *mlp), norm, lm_head)


def _moe_logits(hidden, x, routing_weights, routed, shared, norm: tuple, lm_head: torch.Tensor) -> tuple:
    """The last layer's experts, the final norm and the logits."""
    return _logits(_moe_residual(hidden, x, routing_weights, routed, shared), norm, lm_head)


@dataclass(frozen=True)
class StepGraphs:
    first_stage: Callable[..., tuple]
    dense_stage: Callable[..., tuple]
    moe_stage: Callable[..., tuple]
    dense_logits: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    moe_logits: Callable[..., tuple[torch.Tensor, torch.Tensor]]


_graphs: StepGraphs | None = None


def step_graphs() -> StepGraphs:
    """The stages compiled (dynamic shapes, once per process; Inductor compiles on first call).
    Each kind of call is its own function, so that dynamo checks only that function's graphs'
    guards: one graph each (per cache-length regime, see :func:`warm_up`) for Tiny's layout of a
    dense first layer and MoE layers after it."""
    global _graphs
    if _graphs is None:
        stages = (_first_stage, _dense_stage, _moe_stage, _dense_logits, _moe_logits)
        _graphs = StepGraphs(*(torch.compile(stage, dynamic=True) for stage in stages))
    return _graphs


def _step_linear(linear: nn.Module | None) -> bool:
    """A projection the stages can run: a plain linear on the CPU, or a 4-bit one packed for the
    CPU kernel (8-bit layers, and 4-bit ones on chips without AVX512-BF16, are not)."""
    return is_plain_linear(linear) or packed_4bit(linear) is not None


def _pack_4bit_for_cpu(language: nn.Module) -> None:
    """Have every bitsandbytes 4-bit layer on the CPU repack its weight for the CPU kernel now, as
    it would at its first use (only on chips it has that kernel for): a routed expert may otherwise
    first run in the middle of an answer, and the stages read the packed layout. The dummy row has
    the activations' dtype: a layer's first input also sets the dtype it computes in. Under
    ``no_grad``, not ``inference_mode``: the packed weights stay ordinary tensors."""
    dtype = language.get_input_embeddings().weight.dtype
    with torch.no_grad():
        for module in language.modules():
            weight = getattr(module, "weight", None)
            state = getattr(weight, "quant_state", None)
            if state is None or weight.device.type != "cpu" or not getattr(module, "support_avx512bf16_for_cpu", False):
                continue
            if not getattr(state, "packing_format_for_cpu", False):
                module(torch.zeros(1, module.in_features, dtype=dtype))


def _norm(norm: nn.Module) -> tuple[torch.Tensor, float]:
    return norm.weight.detach(), norm.variance_epsilon


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
    if not getattr(language, "cache_values_dim_major", False):
        return "the cache does not store values dimension-major"
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        projections = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if not all(_step_linear(p) for p in projections):
            return "attention projections are neither plain nor 4-bit packed for the CPU (8-bit, or no AVX512-BF16?)"
        if attention.num_key_value_groups != 1:
            return "grouped-query attention"
        experts = getattr(mlp, "experts", None)
        if experts is None:
            if not is_plain_swiglu(mlp, _step_linear):
                return "dense MLP is not a plain SwiGLU"
            continue
        gate = mlp.gate
        if not isinstance(experts, RoutedExperts) or not all(is_plain_swiglu(e, _step_linear) for e in experts):
            return "routed experts are neither plain nor 4-bit packed for the CPU (8-bit, or no AVX512-BF16?)"
        if getattr(gate, "topk_method", None) != "greedy" or not is_plain_swiglu(mlp.shared_experts, _step_linear):
            return "router or shared experts not supported"
    return None


def _grows_in_place(cache, attention_mask: torch.Tensor | None) -> bool:
    """A cache the graphs can write into: every layer a :class:`GrowingLayer` holding the same
    number of tokens, its values dimension-major (as ``new_cache()`` makes them for a model that
    :func:`supports`); and a padding mask, if any, covering exactly those tokens and the new one."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(layer, GrowingLayer) and layer.values_dim_major for layer in layers):
        return False
    length = layers[0].get_seq_length()
    return (
        length > 0
        and all(layer.get_seq_length() == length for layer in layers)
        and (attention_mask is None or attention_mask.shape[-1] == length + 1)
    )


@dataclass(frozen=True)
class _LayerArguments:
    """What the stages take from one decoder layer, gathered once (see :class:`TinyDecodeStep`)."""

    attention: tuple  # q, k, v, o weights
    scaling: float
    post_attention_norm: tuple[torch.Tensor, float]
    router: tuple | None  # gate weight, top-k, scaling; None in a dense layer
    next_norm: tuple[torch.Tensor, float]  # the next layer's input norm, or the final norm
    mlp: tuple  # the dense MLP's or the shared experts' gate, up and down weights
    experts: list[tuple] | None  # each routed expert's gate, up and down weights


def _layer_arguments(text: nn.Module, index: int) -> _LayerArguments:
    layers = text.layers
    layer = layers[index]
    attention, gate = layer.self_attn, getattr(layer.mlp, "gate", None)
    moe = gate is not None
    return _LayerArguments(
        attention=tuple(product_weight(getattr(attention, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
        scaling=attention.scaling,
        post_attention_norm=_norm(layer.post_attention_layernorm),
        router=(gate.weight.detach(), gate.top_k, gate.routed_scaling_factor) if moe else None,
        next_norm=_norm(text.norm if index + 1 == len(layers) else layers[index + 1].input_layernorm),
        mlp=swiglu_weights(layer.mlp.shared_experts if moe else layer.mlp),
        experts=[swiglu_weights(expert) for expert in layer.mlp.experts] if moe else None,
    )


def step_inputs(
    text: nn.Module,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    cache,
    position_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
    """A step's token embedding (``inputs_embeds`` itself when given), the number of tokens already
    cached, and the token's rotary cos and sin (at ``position_ids``, by default the next position)."""
    hidden = text.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
    cached = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.full((1, 1), cached, dtype=torch.long)
    cos, sin = text.rotary_emb(hidden, position_ids)
    return hidden, cached, cos, sin


class TinyDecodeStep:
    """Runs one decode step of ``language`` (a ``VL2TinyForCausalLM``) through :class:`StepGraphs`.

    Each layer's weights, norms and router are gathered when the step is made, after the loader
    has placed and packed them, not looked up every step: between two graphs a step runs only
    Python, and there every attribute lookup misses the CPU's caches, which the graph before has
    just filled with weights (full-size Tiny: 318 ``detach`` calls and their lookups a step;
    gathering them once made steps 3-8 % faster, paired)."""

    def __init__(self, language: nn.Module, graphs: StepGraphs) -> None:
        self.language = language
        self.graphs = graphs
        text = language.model
        self._layers = [_layer_arguments(text, index) for index in range(len(text.layers))]
        self._lm_head = product_weight(language.lm_head)

    def __deepcopy__(self, memo: dict) -> None:
        # The step holds this model's weights, gathered; a deep copy of the model has its own (and
        # copying the step would copy them once more), so it decodes with the stock decoder.
        return None

    @staticmethod
    def applies(tokens: torch.Tensor | None, cache, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        return (
            tokens is not None
            and tokens.shape[:2] == (1, 1)
            and tokens.device.type == "cpu"
            and torch.is_inference_mode_enabled()
            and (attention_mask is None or attention_mask.dim() == 2)
            and not any(kwargs.get(name) for name in ("output_attentions", "output_hidden_states"))
            and _grows_in_place(cache, attention_mask)
        )

    def _attention(self, index: int, cache) -> tuple:
        """Layer ``index``'s attention arguments, its cache grown by the new token's slot."""
        layer = self._layers[index]
        key_buffer, value_buffer = cache.layers[index].extend(1)
        return (*layer.attention, key_buffer, value_buffer, layer.scaling, *layer.post_attention_norm)

    def _router(self, index: int) -> tuple | None:
        return self._layers[index].router

    def __call__(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        cache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> CausalLMOutputWithPast:
        graphs, text = self.graphs, self.language.model
        hidden, cached, cos, sin = step_inputs(text, input_ids, inputs_embeds, cache, position_ids)
        length = cached + 1
        if attention_mask is None:
            allowed = torch.ones(1, 1, 1, length, dtype=torch.bool)
        else:  # padding (a 2-D mask as ``generate`` keeps it), already covering this token
            allowed = attention_mask.bool().view(1, 1, 1, -1)
        rotary = (cos.reshape(-1), sin.reshape(-1), torch.tensor([cached]), allowed)
        layers = self._layers
        x = text.layers[0].input_layernorm(hidden).reshape(-1)
        hidden, x, routing = graphs.first_stage(
            hidden.reshape(-1), x, self._attention(0, cache), rotary, layers[0].router
        )
        for index, layer in enumerate(layers):
            if routing is None:
                ffn = (layer.mlp,)
                stage, logits_stage = graphs.dense_stage, graphs.dense_logits
            else:
                routing_weights, chosen = routing
                routed = [w for expert in chosen.tolist() for w in layer.experts[expert]]
                ffn = (routing_weights, routed, layer.mlp)
                stage, logits_stage = graphs.moe_stage, graphs.moe_logits
            if index + 1 == len(layers):
                logits, _ = logits_stage(hidden, x, *ffn, layer.next_norm, self._lm_head)
            else:
                attention, router = self._attention(index + 1, cache), layers[index + 1].router
                hidden, x, routing = stage(hidden, x, *ffn, layer.next_norm, attention, rotary, router)
        return CausalLMOutputWithPast(logits=logits.view(1, 1, -1), cache=cache)


# Inductor picks its loops by the sizes it first sees and guards on them: past 4,096 in a reduction
# (heads x tokens, or tokens alone) it compiles again. Warm-up steps run at each side of those.
REDUCTION_SPLIT = 4096


def _lengthen(cache, tokens: int) -> None:
    """Append ``tokens`` zero keys and values to every layer of ``cache`` (a warm-up filler)."""
    for layer in cache.layers:
        layer.extend(tokens)
        layer.keys[..., -tokens:, :].zero_()
        layer.values[..., -tokens:, :].zero_()


def warm_up(language: nn.Module, step: TinyDecodeStep) -> None:
    """Compile the stages now, with the model's real shapes and at each cache length where
    Inductor would compile again, and check each step against the stock decoder (from the same
    cache; both steps write the same position)."""
    # Past the context too: nothing stops an answer at max_position_embeddings.
    lengths = (3, REDUCTION_SPLIT // language.config.num_attention_heads + 1, REDUCTION_SPLIT + 1)
    # A relative error over all logits: in bf16 the stages round where the stock decoder does but
    # fuse the arithmetic in between, and full-size random weights (logits up to about 5) then
    # differ by 2-5 % (measured); a wrong graph (a wrong expert, slot or rotation) is far off.
    # 4-bit layers round their input to bf16 even in an fp32 model, so tiny differences before them
    # can flip a rounding.
    exact = language.lm_head.weight.dtype == torch.float32 and not any(
        packed_4bit(module) for module in language.modules()
    )
    tolerance = 1e-4 if exact else 0.1
    # Without duck sizing: the warm-up's cache length could equal another size (a small model's
    # head count) and the graphs would then be specialized on that equality, and compiled again
    # in the middle of the first answer.
    with torch.inference_mode(), fx_config.patch(use_duck_shape=False):
        cache = growing_cache(language.config, values_dim_major=True)
        language(input_ids=torch.tensor([[0, 1, 2]]), cache=cache, use_cache=True)
        for length in lengths:
            if length > cache.get_seq_length():
                _lengthen(cache, length - cache.get_seq_length())
            token = torch.tensor([[3]])
            got = step(token, None, cache, None, None).logits
            cache.crop(-1)  # drop the fast step's token; the stock step writes it again
            saved, language.decode_step = language.decode_step, None
            try:
                expected = language(input_ids=token, cache=cache, use_cache=True).logits
            finally:
                language.decode_step = saved
            cache.crop(-1)
            error = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
            if not error < tolerance:
                raise AssertionError(f"logits differ from the stock decoder's by {error:.1e} at {length} tokens")


def use_decode_step(language: nn.Module) -> str | None:
    """Give ``language`` the compiled whole-step decoder where it applies. Returns a line for the
    compute summary: "whole steps compiled", or why compiling or checking it failed (the stock
    decoder stays); ``None`` where it does not apply (see :func:`supports`)."""
    if hasattr(type(language), "decode_step"):
        try:
            _pack_4bit_for_cpu(language)
        except Exception as exc:  # a layer bitsandbytes cannot repack: supports() then says no
            logger.warning("4-bit layers not packed for the CPU kernel (%s)", describe_failure(exc))
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
