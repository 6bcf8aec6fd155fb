"""Which dtype the CPU multiplies in, chosen per phase by measuring this machine.

Weights stay in bf16 on the CPU (half the memory, half the bytes a decode step reads). Whether
bf16 is also the right dtype to *multiply* in depends on the chip: with AVX512-BF16 or AMX a
bf16 GEMM runs 2–3× faster than fp32, but on AVX2-only chips PyTorch's bf16 GEMM is 5–40× slower
than fp32 (measured: a 1024-token prefill of Tiny took 45 s in bf16 against ≈8 s in fp32). So at
load we time one prefill-shaped GEMM in both dtypes and, where bf16 loses:

* many-row products (prefill, vision) upcast the weight and multiply in fp32 — the upcast costs
  one pass over the weight, small next to a GEMM with hundreds of rows;
* few-row products (decode) stay in bf16, where they are memory bound and bf16 reads half the bytes;
* bitsandbytes 4-bit layers switch their compute dtype the same way;
* the vision tower, which only ever sees many rows, is stored in fp32 (0.8 GB more for SigLIP).

Activations and the KV cache stay in the weights' dtype, so both phases share one cache. Decode
steps get compiled one-row kernels on any CPU (``model/cpu/kernels.py``) and, for Tiny, a
compiled whole-step decoder (``model/cpu/decode.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..environment import read_choice
from .decode import use_decode_step
from .kernels import CpuLinear, as_cpu_linear, decode_kernels, use_cpu_attention, use_decode_kernels
from .native import use_native_decode_step
from .vision import fuse_vision_mlp

# Below this many rows a product is memory bound and bf16 (fewer bytes) wins on any CPU.
MIN_ROWS_FOR_FP32 = 16
# VL2_CPU_GEMM=auto (measure), bf16 (always bf16) or fp32 (fp32 for many-row products).
CHOICE_ENV = "VL2_CPU_GEMM"
# glibc's malloc maps every block above 32 MiB on its own and unmaps it when freed, so a vision
# batch whose MLP activation is larger faults all its pages in again in every layer. Batches are sized to stay
# under this. Measured on full-size Tiny in bf16, 7 tiles: 2.56 s a tile as one batch, 2.37 s in
# batches of 4, 2.39 s in batches of 2 (same process, interleaved).
VISION_ACTIVATION_BYTES = 24 * 2**20


@dataclass(frozen=True)
class GemmSpeeds:
    fp32_gflops: float
    bf16_gflops: float

    @property
    def bf16_is_slow(self) -> bool:
        return self.bf16_gflops < 0.8 * self.fp32_gflops


def measure_gemm_speeds(rows: int = 256, size: int = 1024, seconds: float = 0.15) -> GemmSpeeds:
    """Time ``F.linear`` of a prefill-shaped product in fp32 and bf16 (about 0.3 s in all)."""
    speeds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(rows, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        F.linear(x, w)
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds or count < 2:
            F.linear(x, w)
            count += 1
        speeds[dtype] = count * 2 * rows * size * size / elapsed / 1e9
    return GemmSpeeds(fp32_gflops=speeds[torch.float32], bf16_gflops=speeds[torch.bfloat16])


def _pick_4bit_compute_dtype(module: nn.Module, args: tuple) -> None:
    # One generation at a time runs per model (the app's lane), so flipping an attribute is safe.
    x = args[0]
    rows = x.numel() // x.shape[-1]
    module.compute_dtype = torch.float32 if rows >= MIN_ROWS_FOR_FP32 else module.decode_compute_dtype


def use_fp32_for_many_rows(language_model: nn.Module) -> int:
    """Make every bf16 linear (and 4-bit linear) under ``language_model`` multiply in fp32 for
    prefill-sized inputs and in bf16 for decode. Returns the number of layers changed."""
    changed = 0
    for module in language_model.modules():
        if isinstance(module, nn.Linear) and module.weight.dtype in (torch.bfloat16, torch.float16):
            linear = as_cpu_linear(module)  # same parameters, same names: only the forward differs
            if linear is not None:
                linear.fp32_from_rows = MIN_ROWS_FOR_FP32
                changed += 1
        elif type(module).__name__ == "Linear4bit" and module.weight.device.type == "cpu":
            module.decode_compute_dtype = module.compute_dtype or torch.bfloat16
            module.compute_type_is_set = True  # our hook chooses; bitsandbytes' first-call guess is not needed
            module.register_forward_pre_hook(_pick_4bit_compute_dtype)
            changed += 1
    return changed


@dataclass(frozen=True)
class CpuComputePlan:
    speeds: GemmSpeeds | None  # None for fp32 models: nothing to choose
    fp32_for_many_rows: bool
    decode: str  # which kernels decode steps use (model/cpu/kernels.py)
    vision_tiles_per_batch: int | None = None  # None: no vision tower on the CPU
    vision_mlp: str = ""  # how the vision MLP runs (model/cpu/vision.py)

    def describe(self) -> str:
        if self.speeds is None:
            gemm = "CPU GEMM: fp32 throughout"
        else:
            choice = "fp32 for prefill and vision, bf16 for decode" if self.fp32_for_many_rows else "bf16 throughout"
            gemm = (
                f"CPU GEMM: bf16 {self.speeds.bf16_gflops:.0f} GFLOP/s, fp32 {self.speeds.fp32_gflops:.0f} GFLOP/s "
                f"→ {choice}"
            )
        vision = "" if self.vision_tiles_per_batch is None else f"; vision: {self.vision_tiles_per_batch} tiles a batch"
        if self.vision_mlp:
            vision += f", {self.vision_mlp}"
        return f"{gemm}{vision}; decode: {self.decode}"


def vision_tiles_per_batch(vision_config, element_size: int, default: int) -> int:
    """Tiles per vision batch on the CPU: as many as keep one MLP activation under
    ``VISION_ACTIVATION_BYTES`` (at least 1, at most ``default``)."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    per_tile = patches * vision_config.intermediate_size * element_size
    return max(1, min(default, VISION_ACTIVATION_BYTES // per_tile))


def _is_low_precision(model: nn.Module) -> bool:
    return any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters()) or any(
        type(m).__name__ == "Linear4bit" for m in model.modules()
    )


def apply_cpu_compute(model: nn.Module, speeds: GemmSpeeds | None = None) -> CpuComputePlan | None:
    """Choose how the CPU computes ``model`` (a whole model, or the CPU's share of a placed one):
    the GEMM dtype of many-row products for bf16/fp16 weights, and compiled decode kernels.
    ``None`` when ``model`` is not on the CPU."""
    language = getattr(model, "language", model)
    first = next(language.parameters(), None)
    if first is None or first.device.type != "cpu":
        return None
    choice = read_choice(CHOICE_ENV, ("auto", "bf16", "fp32"))
    fp32 = False
    if _is_low_precision(model):
        speeds = speeds or measure_gemm_speeds()
        fp32 = speeds.bf16_is_slow if choice == "auto" else choice == "fp32"
    else:
        speeds = None
    if fp32:
        use_fp32_for_many_rows(language)
        for part in ("vision", "projector"):
            module = getattr(model, part, None)
            if module is not None:
                module.float()
    vision = getattr(model, "vision", None)
    tiles, vision_mlp = None, ""
    if vision is not None and hasattr(model, "vision_tiles_per_batch"):
        element_size = vision.embeddings.patch_embedding.weight.element_size()
        tiles = vision_tiles_per_batch(model.config.vision_config, element_size, model.vision_tiles_per_batch)
        model.vision_tiles_per_batch = tiles
        vision_mlp = fuse_vision_mlp(vision)
    # Full-precision linears only: bitsandbytes' layers subclass nn.Linear but hold packed bytes.
    dtypes = {m.weight.dtype for m in language.modules() if type(m) in (nn.Linear, CpuLinear)}
    kernels, decode = decode_kernels(dtypes) if dtypes else (None, "bitsandbytes' kernels")
    if kernels is None:
        use_cpu_attention(language)
    else:
        use_decode_kernels(language, kernels)
        # The native step where it applies (bf16 on AVX512-BF16), else the compiled one.
        native = use_native_decode_step(language)
        compiled = use_decode_step(language) if getattr(language, "decode_step", None) is None else None
        decode += "".join(f"; {line}" for line in (native, compiled) if line is not None)
    return CpuComputePlan(
        speeds=speeds, fp32_for_many_rows=fp32, decode=decode, vision_tiles_per_batch=tiles, vision_mlp=vision_mlp
    )
