"""Fitting a model into a GPU memory budget by keeping some MoE layers' experts on the CPU.

Small in 4-bit is 9.8 GB; an 8 GB card holds everything but ≈3 GB of its routed experts. accelerate's
offload would copy every offloaded weight to the GPU on every forward. Instead (as llama.cpp's
``--n-cpu-moe`` and KTransformers do) the experts that do not fit stay in CPU memory and are
*computed there*: a decode step sends one hidden vector per token to the CPU and back, and reads
only the six routed experts it picked — a few MB per layer.

The unit of placement is one MoE layer's *routed group*: its router and all of its routed
experts. A group is never split, so a token's routing decision and the experts it selects live on
the same device. Everything else (vision, projector, embeddings, attention, shared experts,
norms, ``lm_head``) and the KV cache stay on the GPU. Groups are offloaded from the first MoE layer
upward (llama.cpp's ``--n-cpu-moe`` counts the same way) until the rest fits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .cpu.compute import CpuComputePlan, apply_cpu_compute
from .kv_cache import kv_cache_bytes

MIB, GIB = 2**20, 2**30
# Outside PyTorch's allocator: the CUDA context and cuBLAS workspaces.
CONTEXT_OVERHEAD = 512 * MIB
# Inside it, beyond weights and KV: a batch of 8 vision tiles, a prefill chunk's activations and
# allocator slack (measured peaks are in the benchmark note).
ACTIVATION_RESERVE = 768 * MIB
# DeepSeek-VL2's sequence length: the KV cache is reserved for a full context.
MAX_CONTEXT_TOKENS = 4096
# Stored bytes per weight of a bitsandbytes-quantized linear: NF4 with double quantization packs
# two values a byte, one 8-bit absmax per 64 weights and one fp32 absmax per 256 blocks; int8 is
# a byte (its fp32 scale per row is left out: < 0.5 %). Plus, per 4-bit tensor, its codebooks and
# packed state (measured: 1,280 bytes).
QUANTIZED_BYTES_PER_WEIGHT = {"4bit": 0.5 + 1 / 64 + 4 / (64 * 256), "8bit": 1.0}
QUANTIZED_BYTES_PER_TENSOR = {"4bit": 1280, "8bit": 0}

_ROUTED_GROUP = re.compile(r"\.layers\.(\d+)\.mlp\.(gate|experts)\.")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(gib|gb|mib|mb|g|m)?\s*$", re.IGNORECASE)


class PlacementError(ValueError):
    """The budget cannot hold even the parts that must be on the GPU; the message says how much is needed."""


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"7.5GB"``, ``"8000MiB"`` or a bare number of GiB → bytes."""
    match = _SIZE.match(str(text))
    if match is None:
        raise ValueError(f"cannot read {text!r} as a memory size; write it like 8GiB, 7.5GB or 8000MiB")
    value, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    scale = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": MIB, "m": MIB, "mb": 10**6}[unit]
    return int(value * scale)


def routed_group_layer(name: str) -> int | None:
    """The layer index if ``name`` is a parameter of a MoE layer's router or routed experts."""
    match = _ROUTED_GROUP.search(name)
    return int(match.group(1)) if match else None


def _quant_state_bytes(tensor: torch.Tensor) -> int:
    """bitsandbytes keeps 4-bit block statistics beside the weight, not as parameters (≈3 %)."""
    state = getattr(tensor, "quant_state", None)
    if state is None or not hasattr(state, "as_dict"):
        return 0
    return sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values() if torch.is_tensor(v))


def model_costs(
    model: nn.Module, quantization: str | None = None, unquantized: tuple[str, ...] = ()
) -> tuple[int, dict[int, int]]:
    """``(bytes that must be on the GPU, {moe layer: bytes of its routed group})``.

    Exact for a loaded model (4-bit statistics included). On the meta device (before loading) the
    size of each linear weight that bitsandbytes will quantize is estimated from ``quantization``.
    """
    to_quantize = set()
    if quantization is not None:
        to_quantize = {
            f"{name}.weight"
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not any(part in name for part in unquantized)
        }
    resident = 0.0
    groups: dict[int, float] = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" and name in to_quantize:
            size = tensor.numel() * QUANTIZED_BYTES_PER_WEIGHT[quantization]
            size += QUANTIZED_BYTES_PER_TENSOR[quantization]
        else:
            size = tensor.numel() * tensor.element_size() + _quant_state_bytes(tensor)
        layer = routed_group_layer(name)
        if layer is None:
            resident += size
        else:
            groups[layer] = groups.get(layer, 0.0) + size
    return int(resident), {layer: int(size) for layer, size in sorted(groups.items())}


@dataclass(frozen=True)
class Placement:
    budget_bytes: int
    reserve_bytes: int
    resident_bytes: int
    group_bytes: Mapping[int, int] = field(default_factory=dict)
    cpu_layers: tuple[int, ...] = ()

    @property
    def gpu_layers(self) -> tuple[int, ...]:
        return tuple(layer for layer in self.group_bytes if layer not in self.cpu_layers)

    @property
    def cpu_bytes(self) -> int:
        return sum(self.group_bytes[layer] for layer in self.cpu_layers)

    @property
    def gpu_weight_bytes(self) -> int:
        return self.resident_bytes + sum(self.group_bytes[layer] for layer in self.gpu_layers)

    @property
    def offloads(self) -> bool:
        return bool(self.cpu_layers)

    def describe(self) -> str:
        text = (
            f"GPU budget {self.budget_bytes / GIB:.1f} GiB: weights {self.gpu_weight_bytes / GIB:.2f} GiB "
            f"+ reserve {self.reserve_bytes / GIB:.2f} GiB (KV cache, activations, CUDA context)"
        )
        if not self.cpu_layers:
            return text + "; everything on the GPU"
        first, last = self.cpu_layers[0], self.cpu_layers[-1]
        which = f"layer {first}" if first == last else f"layers {first}–{last}"
        return (
            text + f"; routed experts of {len(self.cpu_layers)}/{len(self.group_bytes)} MoE layers "
            f"({self.cpu_bytes / GIB:.2f} GiB, {which}) on the CPU"
        )


def plan_placement(
    resident_bytes: int, group_bytes: Mapping[int, int], budget_bytes: int, reserve_bytes: int
) -> Placement:
    """Offload whole routed groups, first MoE layer upward, until the GPU part fits the budget."""
    room = budget_bytes - reserve_bytes - resident_bytes
    if room < 0:
        raise PlacementError(
            f"a GPU budget of {budget_bytes / GIB:.1f} GiB cannot hold the parts that must stay on the GPU: "
            f"{resident_bytes / GIB:.2f} GiB of non-expert weights plus {reserve_bytes / GIB:.2f} GiB reserved "
            f"for the KV cache and activations. Use a larger --gpu-memory, --quantization 4bit, or --device cpu."
        )
    on_gpu = sum(group_bytes.values())
    cpu_layers: list[int] = []
    for layer in sorted(group_bytes):
        if on_gpu <= room:
            break
        cpu_layers.append(layer)
        on_gpu -= group_bytes[layer]
    return Placement(budget_bytes, reserve_bytes, resident_bytes, dict(group_bytes), tuple(cpu_layers))


def plan_for_model(
    model: nn.Module,
    budget_bytes: int,
    *,
    quantization: str | None = None,
    unquantized: tuple[str, ...] = (),
    context_tokens: int = MAX_CONTEXT_TOKENS,
) -> Placement:
    text_config = model.config.text_config
    reserve = kv_cache_bytes(text_config, context_tokens) + ACTIVATION_RESERVE + CONTEXT_OVERHEAD
    resident, groups = model_costs(model, quantization, unquantized)
    return plan_placement(resident, groups, budget_bytes, reserve)


# -- running a placed model ---------------------------------------------------------------------
def _inputs_to_module_device(module: nn.Module, args: tuple) -> tuple:
    module._caller_device = args[0].device
    return tuple(a.to(module._home_device) if isinstance(a, torch.Tensor) else a for a in args)


def _output_to_caller_device(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(module._caller_device)


def _offload_group(mlp: nn.Module, device: torch.device) -> None:
    """Keep ``mlp``'s router and routed experts on ``device`` and compute them there.

    The router receives the hidden states on ``device`` and leaves its routing there; the experts
    return their mixed output to the device the layer runs on, where the shared experts add to it.
    """
    for part in (mlp.gate, mlp.experts):
        part.to(device)
        part._home_device = device
        part.register_forward_pre_hook(_inputs_to_module_device)
    mlp.experts.register_forward_hook(_output_to_caller_device)


def _move_except(module: nn.Module, device: torch.device, keep: set[nn.Module]) -> None:
    if module in keep:
        return
    if not any(sub in keep for sub in module.modules()):
        module.to(device)
        return
    module._apply(lambda t: t.to(device), recurse=False)  # its own parameters and buffers only
    for child in module.children():
        _move_except(child, device, keep)


def cpu_share(model: nn.Module, placement: Placement) -> nn.ModuleList:
    """The routed experts ``placement`` leaves on the CPU, as one module."""
    layers = model.language.model.layers
    return nn.ModuleList(layers[layer].mlp.experts for layer in placement.cpu_layers)


def unpack_4bit_linears(module: nn.Module, dtype: torch.dtype, via: str | torch.device | None = None) -> int:
    """Replace every bitsandbytes 4-bit linear under ``module`` (on the CPU) by a plain ``nn.Linear``
    holding its dequantized weight in ``dtype``; returns how many were replaced.

    For the CPU's share of a placed model. In a CUDA process bitsandbytes loads its CUDA library,
    which has no fused 4-bit CPU kernel: each product then dequantizes the whole matrix first
    (measured on an H200 machine: full-size Small with 9 of 26 layers' experts on the CPU decoded
    0.8 tokens/s, first token after 10.6 s). Plain linears get the CPU's own GEMM and the compiled
    one-row decode kernels, for 4x the bytes of RAM: 9.8 tokens/s, first token after 1.3-1.8 s.
    The values are the 4-bit ones, so the output stays that of the quantized model. ``via`` (the
    GPU) does the dequantizing, rather than bitsandbytes' unfused CPU path.
    """
    import bitsandbytes.functional as bnb_functional

    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ != "Linear4bit":
                continue
            data, state = child.weight.data, child.weight.quant_state
            if getattr(state, "packing_format_for_cpu", False):  # repacked for bitsandbytes' AVX512 CPU kernel
                data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, state)
            if via is not None:
                data = data.to(via)
                state.to(via)  # in place
            dense = bnb_functional.dequantize_4bit(data, state).to(device="cpu", dtype=dtype)
            linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
            linear.weight = nn.Parameter(dense, requires_grad=False)
            if child.bias is not None:
                linear.bias = nn.Parameter(child.bias.detach().to(device="cpu", dtype=dtype), requires_grad=False)
            setattr(parent, name, linear)
            replaced += 1
    return replaced


def compute_share_on_cpu(
    model: nn.Module,
    placement: Placement,
    dtype: torch.dtype,
    via: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
) -> CpuComputePlan | None:
    """Ready the experts ``placement`` left on the CPU for computing there: 4-bit ones unpacked
    (:func:`unpack_4bit_linears`), then the CPU's GEMM dtype and decode kernels, chosen once for
    all of them (``model/cpu/compute.py``)."""
    say = progress if progress is not None else (lambda _message: None)
    share = cpu_share(model, placement)
    say(f"unpacking the routed experts of {len(placement.cpu_layers)} layers for the CPU")
    unpack_4bit_linears(share, dtype, via=via)
    say("measuring this CPU and compiling its decode kernels")
    return apply_cpu_compute(share)


def apply_placement(model: nn.Module, placement: Placement, gpu: str | torch.device, cpu: str = "cpu") -> None:
    """Move ``model`` (loaded on the CPU) to ``gpu``, except the routed groups the plan offloads."""
    layers = model.language.model.layers
    offloaded = [layers[index].mlp for index in placement.cpu_layers]
    keep = {part for mlp in offloaded for part in (mlp.gate, mlp.experts)}
    _move_except(model, torch.device(gpu), keep)
    for mlp in offloaded:
        _offload_group(mlp, torch.device(cpu))
    model.placement = placement
