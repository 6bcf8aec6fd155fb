"""Compiled single-token kernels for decoding on the CPU.

A decode step multiplies one row by every weight it touches, so it is bound by memory reads. On
the CPU PyTorch's one-row paths do not reach that bound. Measured on a 2-core AVX512-BF16 EPYC
with full-size Tiny's shapes, weights cold in memory, where ``sum`` reads 27 GB/s:

* ``F.linear`` of one bf16 row reads the weight at 11–15 GB/s (an fp32 row at about 10 GB/s), and
  an expert's three products plus glue take 0.50 ms;
* ``scaled_dot_product_attention`` of one query over a 1,433-token cache takes 2.2 ms a layer,
  where reading its keys and values takes 0.25 ms.

Written as reductions (fp32 accumulation) and compiled by TorchInductor into vectorized, threaded
loops, a one-row product reads at 20–30 GB/s, a whole SwiGLU expert in one call takes 0.26 ms
(27 GB/s, the speed of ``sum``), and the attention a third of SDPA's time. The kernels take
dynamic shapes, so they compile once per weight dtype (10–20 s the first time on a machine, a few
seconds from Inductor's on-disk cache after that), at load rather than during the first answer.

They run only under ``inference_mode``, where ``generate`` runs; other calls keep PyTorch's
kernels. Inductor needs a C++ compiler: where compiling fails the model keeps PyTorch's kernels
and its compute summary says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..environment import read_choice
from ..experts import RoutedExperts

logger = logging.getLogger(__name__)

# VL2_CPU_KERNELS=auto (compile, fall back to PyTorch's kernels), compiled (fail if compiling
# fails) or eager (PyTorch's kernels).
KERNELS_ENV = "VL2_CPU_KERNELS"
ATTENTION_NAME = "vl2_cpu_decode"


def _one_row_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ x`` for one row ``x`` [K] and ``weight`` [N, K], accumulated in fp32."""
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


class Packed4bit(NamedTuple):
    """A bitsandbytes 4-bit weight in its CPU layout: on AVX512-BF16 chips ``Linear4bit`` repacks
    its weight at first use (double-quantized scales become bf16) for a fused kernel."""

    data: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int


def _product(x: torch.Tensor, weight: torch.Tensor | Packed4bit) -> torch.Tensor:
    """``weight @ x`` for one row: a full-precision weight as :func:`_one_row_product`, a 4-bit one
    through bitsandbytes' CPU kernel (the op ``Linear4bit`` itself calls; compiled graphs call it
    as an external kernel). Which one is decided when a graph is traced."""
    if isinstance(weight, Packed4bit):
        return torch.ops.bitsandbytes.gemv_4bit.default(
            x.view(1, -1), weight.data, list(weight.shape), weight.absmax, weight.code, weight.blocksize
        ).view(-1)
    return _one_row_product(x, weight)


def _one_row_swiglu(
    x: torch.Tensor, gate: torch.Tensor | Packed4bit, up: torch.Tensor | Packed4bit, down: torch.Tensor | Packed4bit
) -> torch.Tensor:
    """A SwiGLU MLP, ``down(silu(gate x) * up x)``, for one row in one call (no bias)."""
    hidden = F.silu(_product(x, gate).float()) * _product(x, up).float()
    return _product(hidden.to(x.dtype), down)


def _routed_one_row(
    x: torch.Tensor, routing_weights: torch.Tensor, weights: list[torch.Tensor | Packed4bit]
) -> torch.Tensor:
    """A token's routed experts in one call: ``weights`` holds (gate, up, down) per chosen expert.

    Like the stock path, each expert's output is rounded to the activations' dtype and the mix is
    summed in fp32 (the official model mixes in fp32)."""
    # A down projection's output width: ``shape`` is [N, K] for a tensor and for Packed4bit alike.
    mixed = torch.zeros(weights[2].shape[0], dtype=torch.float32, device=x.device)
    for slot in range(len(weights) // 3):
        expert = _one_row_swiglu(x, *weights[3 * slot : 3 * slot + 3])
        mixed = mixed + expert.float() * routing_weights[slot].float()
    return mixed.to(x.dtype)


def _one_query_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, allowed: torch.Tensor
) -> torch.Tensor:
    """Attention of one query per head over the cache; ``query`` [B, H, 1, D], ``key``/``value``
    [B, H, L, D], ``allowed`` bool [B or 1, 1, 1, L]. Returns [B, H, 1, D]."""
    scores = (query.float() * key.float()).sum(-1) * scale  # [B, H, L]
    scores = scores.masked_fill(~allowed[:, :, 0, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return (probs[..., None] * value.float()).sum(-2, keepdim=True).to(query.dtype)


@dataclass(frozen=True)
class DecodeKernels:
    one_row_product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    one_row_swiglu: Callable[..., torch.Tensor]
    routed_one_row: Callable[..., torch.Tensor]
    one_query_attention: Callable[..., torch.Tensor]


# Compiled once per process; a failure is remembered so later loads do not retry.
_compiled: DecodeKernels | None = None
_failure: str | None = None
_warmed: set[torch.dtype] = set()


def _compile() -> DecodeKernels:
    return DecodeKernels(
        one_row_product=torch.compile(_one_row_product, dynamic=True),
        one_row_swiglu=torch.compile(_one_row_swiglu, dynamic=True),
        routed_one_row=torch.compile(_routed_one_row, dynamic=True),
        one_query_attention=torch.compile(_one_query_attention, dynamic=True),
    )


def _assert_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=0.02 * expected.abs().max().item(), rtol=0.02)


def warm_up(kernels: DecodeKernels, dtypes: set[torch.dtype]) -> None:
    """Compile now (at load), not in the middle of the first answer, and check the results: for
    each weight dtype, with reductions up to and over 4,096 long (Inductor specializes there: the
    dense MLPs' down projections are 6,848–12,288 wide), and with tensors like the real ones
    (weights made outside ``inference_mode``, activations inside)."""
    for dtype in dtypes:
        for width in (64, 4160):
            weight = torch.randn(48, width, dtype=dtype)
            # An MLP 64 → width → 64, so its down projection's reduction is ``width`` long.
            gate, up = torch.randn(width, 64, dtype=dtype), torch.randn(width, 64, dtype=dtype)
            down = torch.randn(64, width, dtype=dtype)
            with torch.inference_mode():
                x, row = torch.randn(width, dtype=dtype), torch.randn(64, dtype=dtype)
                _assert_close(kernels.one_row_product(x, weight), F.linear(x, weight))
                expected = F.linear(F.silu(F.linear(row, gate)) * F.linear(row, up), down)
                _assert_close(kernels.one_row_swiglu(row, gate, up, down), expected)
                # Keys and values as the cache hands them out: views of a longer buffer, the
                # values dimension-major (model/kv_cache.py).
                query = torch.randn(1, 2, 1, 16, dtype=dtype)
                key = torch.randn(1, 2, width + 8, 16, dtype=dtype)[:, :, :width]
                value = torch.randn(1, 2, 16, width + 8, dtype=dtype)[..., :width].transpose(-1, -2)
                allowed = torch.ones(1, 1, 1, width, dtype=torch.bool)
                allowed[..., 0] = False
                expected = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=0.25)
                _assert_close(kernels.one_query_attention(query, key, value, 0.25, allowed), expected)


def packed_4bit(linear: nn.Module | None) -> Packed4bit | None:
    """``linear``'s weight if it is a bias-free ``Linear4bit`` already packed for the CPU kernel."""
    state = getattr(getattr(linear, "weight", None), "quant_state", None)
    if getattr(linear, "bias", None) is not None or not getattr(state, "packing_format_for_cpu", False):
        return None
    return Packed4bit(linear.weight.data, state.absmax, state.code, tuple(state.shape), state.blocksize)


def product_weight(linear: nn.Module) -> torch.Tensor | Packed4bit:
    """What :func:`_product` takes for ``linear``. Detached: dynamo would specialize on each
    Parameter and compile once per layer."""
    return packed_4bit(linear) or linear.weight.detach()


def swiglu_weights(mlp: nn.Module) -> tuple[torch.Tensor | Packed4bit, ...]:
    """An MLP's gate, up and down weights, as :func:`_one_row_swiglu` takes them."""
    return product_weight(mlp.gate_proj), product_weight(mlp.up_proj), product_weight(mlp.down_proj)


def describe_failure(exc: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters), for the compute summary."""
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first_line}"


def decode_kernels(dtypes: set[torch.dtype]) -> tuple[DecodeKernels | None, str]:
    """The compiled kernels warmed up for ``dtypes`` (or ``None``), and a line saying which are used."""
    global _compiled, _failure
    choice = read_choice(KERNELS_ENV, ("auto", "compiled", "eager"))
    if choice == "eager":
        return None, f"PyTorch's kernels ({KERNELS_ENV}=eager)"
    if _failure is None and not dtypes <= _warmed:
        try:
            _compiled = _compiled or _compile()
            warm_up(_compiled, dtypes - _warmed)
            _warmed.update(dtypes)
        except Exception as exc:  # no C++ compiler, unsupported platform, ...: keep PyTorch's kernels
            _failure = describe_failure(exc)
            logger.warning("CPU decode kernels could not be compiled (%s); using PyTorch's kernels", _failure)
    if _failure is not None:
        if choice == "compiled":
            raise RuntimeError(f"{KERNELS_ENV}=compiled but compiling failed: {_failure}")
        return None, f"PyTorch's kernels (compiling failed: {_failure})"
    return _compiled, "compiled one-row kernels"


class CpuLinear(nn.Linear):
    """An ``nn.Linear`` on the CPU with a kernel per phase.

    * one row (a decode step) under ``inference_mode`` (as ``generate`` runs): the compiled one-row
      product, if any;
    * at least ``fp32_from_rows`` rows of a bf16/fp16 weight: the product in fp32 (chips where bf16
      GEMM is slow, ``model/cpu/compute.py``);
    * otherwise ``F.linear``.
    """

    one_row_product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    fp32_from_rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows == 1 and self.one_row_product is not None and torch.is_inference_mode_enabled():
            # detach(): dynamo would specialize on each Parameter's shape and recompile per layer.
            out = self.one_row_product(x.reshape(-1), self.weight.detach())
            if self.bias is not None:
                out = out + self.bias
            return out.view(*x.shape[:-1], -1)
        if self.fp32_from_rows is not None and rows >= self.fp32_from_rows and self.weight.dtype != torch.float32:
            bias = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


def as_cpu_linear(module: nn.Module) -> CpuLinear | None:
    """Turn a plain ``nn.Linear`` into a :class:`CpuLinear` in place (same parameters, same names)."""
    if isinstance(module, CpuLinear):
        return module
    if type(module) is nn.Linear:
        module.__class__ = CpuLinear
        return module
    return None


def _fused_swiglu_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kernels = self.one_row_kernels
    if x.numel() == x.shape[-1] and kernels is not None and torch.is_inference_mode_enabled():
        return kernels.one_row_swiglu(x.reshape(-1), *swiglu_weights(self)).view(*x.shape[:-1], -1)
    return type(self).forward(self, x)


def _fused_routed_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    kernels = self.one_row_kernels
    if hidden_states.shape[0] == 1 and kernels is not None and torch.is_inference_mode_enabled():
        chosen = [self[expert] for expert in top_k_index[0].tolist()]
        weights = [w for expert in chosen for w in swiglu_weights(expert)]
        return kernels.routed_one_row(hidden_states[0], top_k_weights[0], weights).view(1, -1)
    return type(self).forward(self, hidden_states, top_k_index, top_k_weights)


def is_plain_linear(module: nn.Module | None) -> bool:
    """A bias-free :class:`CpuLinear` (a full-precision weight on the CPU)."""
    return isinstance(module, CpuLinear) and module.bias is None


def is_plain_swiglu(module: nn.Module, linear: Callable[[nn.Module | None], bool] = is_plain_linear) -> bool:
    """A SwiGLU MLP whose three projections pass ``linear`` (by default: bias-free
    :class:`CpuLinear`)."""
    projections = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return all(linear(p) for p in projections) and type(getattr(module, "act_fn", None)).__name__ in (
        "SiLUActivation",
        "SiLU",
    )


def cpu_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for CPU models: SDPA (with MLA's narrow values padded, see
    :func:`_narrow_value_attention`), except one query per sequence, which the compiled kernel
    takes."""
    kernels = getattr(module, "decode_kernels", None)
    plain_decode = (
        kernels is not None
        and query.shape[2] == 1
        and query.device.type == "cpu"
        and torch.is_inference_mode_enabled()
        and dropout == 0.0
        and query.shape[1] == key.shape[1]
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and not any(kwargs.get(name) is not None for name in ("softcap", "position_bias", "sliding_window"))
    )
    if not plain_decode:
        if value.stride(-1) != 1:  # SDPA on dimension-major values (our CPU cache) runs 1.7x slower
            value = value.contiguous()
        if query.device.type == "cpu" and value.shape[-1] < query.shape[-1]:
            return _narrow_value_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is None:  # one graph for both: an all-true mask costs one row of bools
        attention_mask = torch.ones(1, 1, 1, key.shape[2], dtype=torch.bool)
    out = kernels.one_query_attention(query, key, value, scale, attention_mask)
    return out.transpose(1, 2).contiguous(), None


def _narrow_value_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    """SDPA for values narrower than queries and keys (MLA: 128 against 192) on the CPU.

    PyTorch's CPU SDPA then leaves its flash kernel for the math path, which materializes every
    score: a 4,000-token prompt of full-size Small (16 heads, bf16) took 2.55 GB and 3.3 s a layer,
    against 51 MB and 0.79 s with the values zero-padded to the queries' width (measured). The
    padding's output columns are zeros and are cut off."""
    width = value.shape[-1]
    padded = F.pad(value, (0, query.shape[-1] - width))
    out, weights = sdpa_attention_forward(module, query, key, padded, attention_mask, dropout, scaling, **kwargs)
    return out[..., :width].contiguous(), weights


def _warm_up_routed(experts: RoutedExperts) -> None:
    """Compile the routed-experts graph now, with the real shapes and number of experts a token
    picks (every MoE layer then shares it), and check it against the stock path."""
    top_k = experts.num_experts_per_tok
    weight = experts[0].gate_proj.weight
    with torch.inference_mode():
        row = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
        chosen, mixing = torch.arange(top_k).view(1, top_k), torch.full((1, top_k), 1.0 / top_k)
        _assert_close(experts(row, chosen, mixing), type(experts).forward(experts, row, chosen, mixing))


def use_decode_kernels(module: nn.Module, kernels: DecodeKernels) -> int:
    """Give the linears, SwiGLU MLPs and attention under ``module`` the compiled one-row paths.

    Every plain ``nn.Linear`` becomes a :class:`CpuLinear` (same parameters); each SwiGLU MLP
    (dense and shared experts) and each token's set of routed experts runs as one call for one
    row, since each dispatch costs about 20 µs and a decode step would otherwise make about 25 per
    MoE layer; attention goes through :func:`cpu_decode_attention`. Returns the number of linears
    changed.
    """
    linears, routed = 0, []
    for sub in module.modules():
        linear = as_cpu_linear(sub)
        if linear is not None:
            linear.one_row_product = kernels.one_row_product
            linears += 1
    for sub in module.modules():
        if is_plain_swiglu(sub):
            sub.one_row_kernels = kernels
            sub.forward = _fused_swiglu_forward.__get__(sub)
        elif isinstance(sub, RoutedExperts) and all(is_plain_swiglu(expert) for expert in sub):
            sub.one_row_kernels = kernels
            sub.forward = _fused_routed_forward.__get__(sub)
            routed.append(sub)
        elif hasattr(sub, "o_proj"):
            sub.decode_kernels = kernels
            if hasattr(sub, "v_proj"):  # multi-head attention caches values: sum them along the fast axis
                module.cache_values_dim_major = True
    if routed:
        _warm_up_routed(routed[0])  # every MoE layer shares the graph
    use_cpu_attention(module)
    return linears


def use_cpu_attention(module: nn.Module) -> None:
    """Route ``module``'s SDPA attention through :func:`cpu_decode_attention`: the compiled
    one-query kernel where attention modules have been given one, and SDPA with MLA's narrow
    values padded (:func:`_narrow_value_attention`) everywhere, with or without kernels."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == "sdpa":
        AttentionInterface.register(ATTENTION_NAME, cpu_decode_attention)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # the same masks as SDPA
        module.set_attn_implementation(ATTENTION_NAME)
