"""Tiny's decode step as one native call (bf16 weights, CPUs with AVX512-BF16).

The compiled whole-step decoder (``model/cpu/decode.py``) keeps a step at 13 Inductor calls, and it
does not keep up when memory is fast: Inductor widens every bf16 weight to fp32 before multiplying
(its one-row products read at most about 37 GB/s on the 2-core EPYC even with the weights in
cache), and about a fifth of a step is Python and dynamo between the calls. No library does this
one thing well: oneDNN's prepacked one-row product reads 100 GB/s from cache but 17 GB/s from
memory where Inductor reads 22 (measured, ``sum`` at 27 GB/s).

``csrc/tiny_decode.c`` is the whole step, every product a ``vdpbf16ps`` and all of it one OpenMP
parallel region, rounding where transformers' decoder rounds. It is compiled here with gcc (about
a second) into a per-user cache, loaded with ``ctypes`` (no torch headers, no ninja), and checked
against the stock decoder at load like the compiled step. Where gcc, AVX512-BF16 or bf16 weights
are missing, the compiled step is used instead.

Full-size Tiny on the 2-core EPYC (``python -m bench --full-size --variants tiny --precisions bf16
--compare-decoders``, 5 rounds and their A/A): a step takes 30-48 ms, 1.05-1.25x (medians
1.14-1.16) the time to read its weights and cache at the speed of ``sum`` just before it (the
higher ratios when memory is fast), and the compiled step 1.29-1.54x the native one's time,
paired. By phase (``python -m bench.decode_parts --full-size --native``, before the 256-bit
loads) it read at 0.6-0.85 of ``sum``. Each chosen expert's weights are separate matrices of
2.3 MB: reading 14 of them in a row ran at 0.6-0.85 of ``sum`` in a separate test (one 331 MB
matrix: 0.76-0.94), whether each thread read half of every one or whole ones, and 3-4 % faster
from 2 MB pages (not worth copying the weights out of the checkpoint's file mapping).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..environment import read, read_choice
from .decode import TinyDecodeStep, step_inputs, supports, warm_up
from .kernels import CpuLinear, describe_failure

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "tiny_decode.c"
# No floating-point contraction: a multiply and an add round separately, as in torch.
FLAGS = ("-O3", "-ffp-contract=off", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-fopenmp", "-shared",
         "-fPIC")  # fmt: skip
CACHE_ENV = "VL2_NATIVE_CACHE"
# VL2_DECODE_STEP=auto (native where it applies, else compiled), native (fail if it cannot run) or
# compiled (the Inductor step of model/cpu/decode.py).
STEP_ENV = "VL2_DECODE_STEP"
MAX_TOP_K = 64  # tiny_decode.c's bound


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("input_eps", ctypes.c_float),
        ("post_eps", ctypes.c_float),
        ("q", ctypes.c_void_p),
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("o", ctypes.c_void_p),
        ("router", ctypes.c_void_p),
        ("mlp_gate", ctypes.c_void_p),
        ("mlp_up", ctypes.c_void_p),
        ("mlp_down", ctypes.c_void_p),
        ("mlp_width", ctypes.c_int64),
        ("expert_gate", ctypes.c_void_p),
        ("expert_up", ctypes.c_void_p),
        ("expert_down", ctypes.c_void_p),
    ]


class _Model(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("n_layers", "hidden", "heads", "head_dim", "experts", "top_k")),
        ("expert_width", ctypes.c_int64),
        ("vocab", ctypes.c_int64),
        ("attention_scale", ctypes.c_float),
        ("routed_scaling", ctypes.c_float),
        ("final_eps", ctypes.c_float),
        ("layers", ctypes.POINTER(_Layer)),
        ("final_norm", ctypes.c_void_p),
        ("lm_head", ctypes.c_void_p),
    ]


class _CacheLayer(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("capacity", ctypes.c_int64)]


def _cache_dir() -> Path:
    if read(CACHE_ENV):
        return Path(read(CACHE_ENV))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vl2-grounding-studio" / "native"


def _compiler() -> list[str]:
    """``CC`` (a command, possibly with options), else gcc, else cc."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) found")
    return shlex.split(compiler)


def build_library(profiled: bool = False) -> Path:
    """The compiled step's shared library, built on first use and cached by source, flags and
    compiler version. ``profiled``: a build that also sums each phase's time into
    ``vl2_phase_seconds`` (``python -m bench.decode_parts --native``)."""
    compiler = _compiler()
    flags = (*FLAGS, "-DVL2_PROFILE") if profiled else FLAGS
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), *compiler, *flags, version)).encode()).hexdigest()[:16]
    library = _cache_dir() / f"tiny_decode-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as scratch:
            built = Path(scratch) / library.name
            command = [*compiler, *flags, "-o", str(built), str(SOURCE), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                errors = result.stderr.strip().splitlines()
                status = f"{compiler[0]} exited with status {result.returncode}"
                raise RuntimeError(errors[0][:200] if errors else status)
            os.replace(built, library)  # atomic: a concurrent load sees the whole file or none
    return library


_libraries: dict[bool, ctypes.CDLL] = {}


def load_library(profiled: bool = False) -> ctypes.CDLL:
    if profiled not in _libraries:
        library = ctypes.CDLL(str(build_library(profiled)))
        library.vl2_decode_step.restype = None
        library.vl2_decode_step.argtypes = [
            ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
            ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(_CacheLayer), ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_int,
        ]  # fmt: skip
        library.vl2_work16_size.restype = library.vl2_work32_size.restype = ctypes.c_int64
        library.vl2_work16_size.argtypes = [ctypes.POINTER(_Model)]
        library.vl2_work32_size.argtypes = [ctypes.POINTER(_Model), ctypes.c_int64]
        _libraries[profiled] = library
    return _libraries[profiled]


def native_supports(language: nn.Module) -> str | None:
    """``None`` when :class:`NativeDecodeStep` can run ``language`` on this machine, else why not."""
    reason = supports(language)
    if reason is not None:
        return reason
    if not getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "the CPU has no AVX512-BF16"
    linears = [m for m in language.model.modules() if isinstance(m, nn.Linear)] + [language.lm_head]
    if any(type(m) not in (nn.Linear, CpuLinear) or m.weight.dtype != torch.bfloat16 for m in linears):
        return "not all linear weights are bf16 (4-bit, 8-bit or fp32)"
    routers = [layer.mlp.gate for layer in language.model.layers if hasattr(layer.mlp, "gate")]
    if not routers:
        return "no MoE layer"
    if any(not 0 < router.top_k <= min(MAX_TOP_K, router.num_experts) for router in routers):
        return f"experts per token outside 1 to min({MAX_TOP_K}, experts)"
    return None


def _pointer(tensor: torch.Tensor) -> int:
    return tensor.data_ptr()


class NativeDecodeStep:
    """Runs one decode step of ``language`` (a ``VL2TinyForCausalLM`` that :func:`native_supports`)
    as one call of ``csrc/tiny_decode.c``. Covers the same steps as :class:`TinyDecodeStep`."""

    def __init__(self, language: nn.Module, library: ctypes.CDLL | None = None) -> None:
        self.language = language
        self._library = library or load_library()
        text, config = language.model, language.config
        self._keep: list[torch.Tensor] = []  # everything the C structures point into
        layers = (_Layer * len(text.layers))()
        for layer, module in zip(layers, text.layers, strict=True):
            self._describe_layer(layer, module)
        attention = text.layers[0].self_attn
        router = next(layer.mlp.gate for layer in text.layers if hasattr(layer.mlp, "gate"))
        self._model = _Model(
            n_layers=len(text.layers),
            hidden=config.hidden_size,
            heads=config.num_attention_heads,
            head_dim=attention.head_dim,
            experts=router.num_experts,
            top_k=router.top_k,
            expert_width=config.moe_intermediate_size,
            vocab=language.lm_head.weight.shape[0],
            attention_scale=attention.scaling,
            routed_scaling=router.routed_scaling_factor,
            final_eps=text.norm.variance_epsilon,
            layers=layers,
            final_norm=self._weight(text.norm.weight),
            lm_head=self._weight(language.lm_head.weight),
        )
        self._layers = layers
        self._cache = (_CacheLayer * len(text.layers))()
        self._work16 = torch.empty(self._library.vl2_work16_size(ctypes.byref(self._model)), dtype=torch.bfloat16)
        self._work32 = torch.empty(0)

    def __deepcopy__(self, memo: dict) -> None:
        # The step points into this model's weights; a deep copy of the model has its own, so it
        # decodes with the stock decoder (``use_native_decode_step`` gives it a step of its own).
        return None

    def applies(self, tokens: torch.Tensor | None, cache, attention_mask: torch.Tensor | None, kwargs: dict) -> bool:
        """The compiled step's steps, while the model still holds the weights this step points
        into (``.float()`` or ``.to()`` after load replaces them: the stock decoder then runs)."""
        return self.language.lm_head.weight.data_ptr() == self._model.lm_head and TinyDecodeStep.applies(
            tokens, cache, attention_mask, kwargs
        )

    def _weight(self, tensor: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> int:
        """A pointer to ``tensor`` as a contiguous ``dtype`` tensor (a copy only where needed)."""
        tensor = tensor.detach().to(dtype).contiguous()
        self._keep.append(tensor)
        return _pointer(tensor)

    def _pointers(self, tensors: list[torch.Tensor]) -> int:
        array = torch.tensor([self._weight(t) for t in tensors], dtype=torch.int64)
        self._keep.append(array)
        return _pointer(array)

    def _describe_layer(self, layer: _Layer, module: nn.Module) -> None:
        attention, mlp = module.self_attn, module.mlp
        layer.input_norm = self._weight(module.input_layernorm.weight)
        layer.post_norm = self._weight(module.post_attention_layernorm.weight)
        layer.input_eps = module.input_layernorm.variance_epsilon
        layer.post_eps = module.post_attention_layernorm.variance_epsilon
        for name in ("q", "k", "v", "o"):
            setattr(layer, name, self._weight(getattr(attention, f"{name}_proj").weight))
        experts = getattr(mlp, "experts", None)
        dense = mlp if experts is None else mlp.shared_experts
        layer.mlp_gate, layer.mlp_up = self._weight(dense.gate_proj.weight), self._weight(dense.up_proj.weight)
        layer.mlp_down = self._weight(dense.down_proj.weight)
        layer.mlp_width = dense.gate_proj.weight.shape[0]
        if experts is not None:
            layer.router = self._weight(mlp.gate.weight, torch.float32)
            layer.expert_gate = self._pointers([e.gate_proj.weight for e in experts])
            layer.expert_up = self._pointers([e.up_proj.weight for e in experts])
            layer.expert_down = self._pointers([e.down_proj.weight for e in experts])

    def __call__(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        cache,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
    ) -> CausalLMOutputWithPast:
        hidden, cached, cos, sin = step_inputs(self.language.model, input_ids, inputs_embeds, cache, position_ids)
        # The step overwrites its input with the last layer's output: never a caller's tensor.
        hidden = hidden.to(torch.bfloat16, copy=inputs_embeds is not None).contiguous()
        cos, sin = cos.contiguous(), sin.contiguous()
        length = cached + 1
        allowed = None if attention_mask is None else attention_mask.to(torch.uint8).contiguous()
        for slot, layer in zip(self._cache, cache.layers, strict=True):
            keys, values = layer.extend(1)
            slot.keys, slot.values, slot.capacity = _pointer(keys), _pointer(values), keys.shape[-2]
        needed = self._library.vl2_work32_size(ctypes.byref(self._model), length)
        if self._work32.numel() < needed:
            self._work32 = torch.empty(2 * needed, dtype=torch.float32)
        logits = torch.empty(self._model.vocab, dtype=torch.bfloat16)
        self._library.vl2_decode_step(
            ctypes.byref(self._model), _pointer(hidden), _pointer(cos), _pointer(sin), cached, length,
            None if allowed is None else _pointer(allowed), self._cache, _pointer(logits), _pointer(self._work16),
            _pointer(self._work32), torch.get_num_threads(),
        )  # fmt: skip
        return CausalLMOutputWithPast(logits=logits.view(1, 1, -1), cache=cache)


def use_native_decode_step(language: nn.Module) -> str | None:
    """Give ``language`` the native step where it applies and ``VL2_DECODE_STEP`` allows it, checked
    against the stock decoder like the compiled step. Returns a line for the compute summary: "whole
    steps native", or why building or checking it failed; ``None`` where it was not tried (then
    the compiled step is tried)."""
    choice = read_choice(STEP_ENV, ("auto", "native", "compiled"))
    reason = None if choice != "compiled" else f"{STEP_ENV}=compiled"
    reason = reason or native_supports(language)
    if reason is not None:
        if choice == "native":
            raise RuntimeError(f"{STEP_ENV}=native, but the native step cannot run this model: {reason}")
        return None
    try:
        step = NativeDecodeStep(language)
        language.decode_step = step
        warm_up(language, step)
    except Exception as exc:  # no compiler, a numerical mismatch, ...: the compiled step is tried
        language.decode_step = None
        if choice == "native":
            raise
        failure = describe_failure(exc)
        logger.warning("native decode step unavailable (%s)", failure)
        return f"native step failed ({failure})"
    return "whole steps native"
