"""Where a CPU decode step of Tiny loses time against the bandwidth floor: read speeds of its parts.

    python -m bench.decode_parts [--full-size] [--rounds 33] [--prompt-tokens 1433] [--split | --native]

Loads Tiny in bf16 and prefills a prompt of random tokens. Then, in rounds that rotate which layer
each part reads (so that no part finds another's data in the cache) and alternate their order, it
times:

* ``sum``: the floor's read (``machine_floors``);
* ``lm_head``: the compiled one-row product over ``lm_head``, the largest single read of a step;
* ``attention``: the compiled one-query attention over one layer's cached keys and values;
* ``routed experts``: one token's six routed experts, as one compiled call;
* ``moe stage``: the compiled whole-step decoder's graph for one MoE layer (``model/cpu/decode.py``):
  experts, residual, next norm, attention and router, as a step calls it;
* ``step``: a whole decode step.

Each is reported as GB/s of the bytes it must read, and as its median ratio to ``sum`` timed in
the same round. Everything runs on the compute thread, as the app does: timed from another thread,
a second OpenMP team makes every parallel region slower (``model/compute_thread.py``).

A part timed alone also pays what a call costs after a large read (Python's objects are no
longer in the CPU's caches): about 0.2 ms, most of the attention's time. Where a whole step's time
goes is what ``--split`` shows:

    TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1 python -m bench.decode_parts --full-size --split

profiles a few steps and splits their time into Inductor's kernels (named per graph, each layer's
stage fused into about one kernel) and everything else: Python between the graphs, dynamo's guard
checks, the graphs' own wrappers, ``topk``. The environment variable must be set before the
kernels compile (it changes Inductor's cache key); the profiler adds a little to the rest.

The parts above are the compiled step's (``VL2_DECODE_STEP=compiled``). ``--native`` times the
native step (``model/cpu/native.py``, bf16 on AVX512-BF16) by phase instead, from a build of
``csrc/tiny_decode.c`` that notes the time at each phase's end: each phase's milliseconds and the
speed at which it read its bytes, against ``sum`` read just before the step.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from model import compute_thread
from model.cpu import native as native_decode
from model.cpu.decode import _norm, step_graphs
from model.cpu.kernels import decode_kernels, product_weight, swiglu_weights
from model.loading import load_model

from .__main__ import _cache_bytes, build, read_once_gb_per_s, read_source, step_costs


def _bytes(tensors) -> float:
    return float(sum(t.numel() * t.element_size() for t in tensors))


def _prefilled(full_size: bool, prompt_tokens: int, generator: torch.Generator, step: str = "compiled"):
    """Tiny loaded in bf16 with the ``step`` whole-step decoder (``VL2_DECODE_STEP``) and a prompt of
    random tokens prefilled: (model, cache, next token)."""
    with mock.patch.dict(os.environ, VL2_DECODE_STEP=step):
        model = load_model(build("tiny", full_size), device="cpu", dtype="bf16").model
    with torch.inference_mode():
        prompt = torch.randint(100, 1000, (1, prompt_tokens), generator=generator)
        out = model.language(input_ids=prompt, cache=model.new_cache(), use_cache=True, logits_to_keep=1)
    return model, out.cache, out.logits[:, -1:].argmax(-1)


def measure(full_size: bool, rounds: int, prompt_tokens: int) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(0)
    model, cache, token = _prefilled(full_size, prompt_tokens, generator)
    language = model.language
    text, step, graphs = language.model, language.decode_step, step_graphs()
    if step is None:
        raise SystemExit("the whole-step CPU decoder is not in use (see the model's compute summary)")
    weight_dtype = language.lm_head.weight.dtype
    kernels, _ = decode_kernels({weight_dtype})
    floor_source = read_source(torch.device("cpu"))
    moe_layers = [i for i, layer in enumerate(text.layers) if hasattr(layer.mlp, "experts")]
    samples: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with torch.inference_mode():
        hidden_size = language.config.hidden_size
        hidden = torch.randn(hidden_size, dtype=weight_dtype, generator=generator)
        x = torch.randn(hidden_size, dtype=weight_dtype, generator=generator)
        cos, sin = text.rotary_emb(hidden[None, None], torch.full((1, 1), prompt_tokens))
        allowed = torch.ones(1, 1, 1, prompt_tokens + 1, dtype=torch.bool)
        rotary = (cos.reshape(-1), sin.reshape(-1), torch.tensor([prompt_tokens]), allowed)
        lm_head = product_weight(language.lm_head)
        top_k = language.config.num_experts_per_tok
        step_bytes = step_costs(model)[1] + _cache_bytes(cache)  # every part restores the cache

        def parts(round_index: int) -> list[tuple[str, Callable[[], object], float]]:
            def layer(offset: int) -> int:
                return moe_layers[(round_index * 5 + offset) % len(moe_layers)]

            routed_layer = text.layers[layer(0)].mlp
            chosen = torch.randperm(len(routed_layer.experts), generator=generator)[:top_k].tolist()
            routed = [w for e in chosen for w in swiglu_weights(routed_layer.experts[e])]
            mixing = torch.full((top_k,), 1.0 / top_k)
            attention_layer = cache.layers[layer(2)]
            keys, values = attention_layer.keys, attention_layer.values
            query = torch.randn(1, keys.shape[1], 1, keys.shape[-1], dtype=weight_dtype, generator=generator)
            scale = keys.shape[-1] ** -0.5
            stage_index = layer(4)
            stage_layer = text.layers[stage_index]
            stage_routed = [w for e in chosen for w in swiglu_weights(stage_layer.mlp.experts[e])]
            shared = swiglu_weights(stage_layer.mlp.shared_experts)
            attention = stage_layer.self_attn
            stage_bytes = _bytes(stage_routed + list(shared)) + _bytes(
                [getattr(attention, n).weight for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
                + [stage_layer.mlp.gate.weight, cache.layers[stage_index].keys, cache.layers[stage_index].values]
            )

            def stage() -> None:
                arguments = step._attention(stage_index, cache)
                norm = _norm(stage_layer.input_layernorm)
                graphs.moe_stage(
                    hidden, x, mixing, stage_routed, shared, norm, arguments, rotary, step._router(stage_index)
                )
                cache.layers[stage_index].crop(-1)

            def whole_step() -> None:
                language(input_ids=token, cache=cache, use_cache=True)
                cache.crop(-1)

            return [
                ("sum", floor_source.sum, _bytes([floor_source])),
                ("lm_head", lambda: kernels.one_row_product(x, lm_head), _bytes([lm_head])),
                (
                    "attention",
                    lambda: kernels.one_query_attention(query, keys, values, scale, allowed[..., :-1]),
                    _bytes([keys, values]),
                ),
                ("routed experts", lambda: kernels.routed_one_row(x, mixing, routed), _bytes(routed)),
                ("moe stage", stage, stage_bytes),
                ("step", whole_step, step_bytes),
            ]

        for round_index in range(rounds + 2):  # the first two warm up
            named = parts(round_index)
            order, speeds = [name for name, _, _ in named], {}
            for name, work, nbytes in named[:: 1 if round_index % 2 else -1]:
                start = time.perf_counter()
                work()
                speeds[name] = nbytes / (time.perf_counter() - start) / 1e9
            if round_index < 2:
                continue
            for name, speed in speeds.items():
                samples.setdefault(name, []).append(speed)
                ratios.setdefault(name, []).append(speed / speeds["sum"])
    return {
        name: {"gb_per_s": statistics.median(samples[name]), "of_sum": statistics.median(ratios[name])}
        for name in order
    }


def split_step(full_size: bool, prompt_tokens: int, steps: int = 8) -> dict[str, float]:
    """Milliseconds a decode step spends in Inductor's kernels and outside them (``--split``)."""
    from torch.profiler import ProfilerActivity, profile

    model, cache, token = _prefilled(full_size, prompt_tokens, torch.Generator().manual_seed(0))
    language = model.language
    with torch.inference_mode():
        walls = []
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(steps):
                start = time.perf_counter()
                language(input_ids=token, cache=cache, use_cache=True)
                walls.append(time.perf_counter() - start)
                cache.crop(-1)
    # Inductor names a profiled kernel after its graph and its fused operations.
    kernel_us = sum(e.self_cpu_time_total for e in profiler.key_averages() if "cpp_fused" in e.key)
    step_ms = statistics.median(walls) * 1e3
    in_kernels_ms = kernel_us / 1e3 / steps
    return {"step_ms": step_ms, "in_kernels_ms": in_kernels_ms, "outside_ms": step_ms - in_kernels_ms}


NATIVE_PHASES = ("input norm", "q, k, v", "rotary, cache write, attention", "o, residual", "norm, router",
                 "experts gate/up", "experts down, residual", "final norm, lm_head")  # fmt: skip


def _phase_bytes(language: torch.nn.Module, cache) -> list[float]:
    """The bytes each phase of a native step reads (as ``NATIVE_PHASES``)."""
    layers, top_k = language.model.layers, language.config.num_experts_per_tok
    attention = [layer.self_attn for layer in layers]
    gate_up, down, router = 0.0, 0.0, 0.0
    for layer in layers:
        if hasattr(layer.mlp, "experts"):
            expert, mlp = layer.mlp.experts[0], layer.mlp.shared_experts
            gate_up += top_k * _bytes([expert.gate_proj.weight, expert.up_proj.weight])
            down += top_k * _bytes([expert.down_proj.weight])
            router += 4 * layer.mlp.gate.weight.numel()  # the step reads an fp32 copy
        else:
            mlp = layer.mlp
        gate_up += _bytes([mlp.gate_proj.weight, mlp.up_proj.weight])
        down += _bytes([mlp.down_proj.weight])
    qkv = _bytes([getattr(a, name).weight for a in attention for name in ("q_proj", "k_proj", "v_proj")])
    return [0.0, qkv, float(_cache_bytes(cache)), _bytes([a.o_proj.weight for a in attention]), router, gate_up,
            down, _bytes([language.lm_head.weight])]  # fmt: skip


def native_phases(full_size: bool, rounds: int, prompt_tokens: int) -> dict[str, dict[str, float | None]]:
    """A native step's time by phase (``--native``): milliseconds, and GB/s of the bytes each phase
    reads against ``sum`` read just before the step."""
    model, cache, token = _prefilled(full_size, prompt_tokens, torch.Generator().manual_seed(0), step="native")
    language = model.language
    library = native_decode.load_library(profiled=True)
    language.decode_step = native_decode.NativeDecodeStep(language, library)
    seconds = (ctypes.c_double * len(NATIVE_PHASES)).in_dll(library, "vl2_phase_seconds")
    phase_bytes = _phase_bytes(language, cache)
    floor_source = read_source(torch.device("cpu"))
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in NATIVE_PHASES}
    with torch.inference_mode():
        for round_index in range(rounds + 2):  # the first two warm up
            floor = read_once_gb_per_s(floor_source)
            before = list(seconds)
            language(input_ids=token, cache=cache, use_cache=True)
            cache.crop(-1)
            if round_index >= 2:
                for name, start, end, nbytes in zip(NATIVE_PHASES, before, seconds, phase_bytes, strict=True):
                    samples[name].append((end - start, nbytes / (end - start) / 1e9 / floor))
    return {
        name: {
            "ms": 1e3 * statistics.median(t for t, _ in rows),
            "of_sum": statistics.median(r for _, r in rows) if phase_bytes[index] else None,
        }
        for index, (name, rows) in enumerate(samples.items())
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode_parts", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--rounds", type=int, default=33)
    parser.add_argument("--prompt-tokens", type=int, default=1433)
    parser.add_argument("--split", action="store_true", help="split a step into kernels and the rest (see above)")
    parser.add_argument("--native", action="store_true", help="a native step's time by phase (see above)")
    args = parser.parse_args(argv)
    if args.native:
        phases = compute_thread.run(native_phases, args.full_size, args.rounds, args.prompt_tokens)
        for name, row in phases.items():
            share = "" if row["of_sum"] is None else f"  {row['of_sum']:.2f} of sum"
            print(f"{name:25s} {row['ms']:6.2f} ms{share}")
        print(f"step {sum(row['ms'] for row in phases.values()):.1f} ms (medians summed)")
        print(json.dumps(phases))
        return 0
    if args.split:
        split = compute_thread.run(split_step, args.full_size, args.prompt_tokens)
        if split["in_kernels_ms"] == 0:
            raise SystemExit("no kernel times: set TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1 (see --help)")
        print(
            f"step {split['step_ms']:.1f} ms: {split['in_kernels_ms']:.1f} ms in compiled kernels, "
            f"{split['outside_ms']:.1f} ms ({split['outside_ms'] / split['step_ms']:.0%}) outside them"
        )
        print(json.dumps({key: round(value, 2) for key, value in split.items()}))
        return 0
    result = compute_thread.run(measure, args.full_size, args.rounds, args.prompt_tokens)
    for name, row in result.items():
        print(f"{name:15s} {row['gb_per_s']:6.1f} GB/s  {row['of_sum']:.2f} of sum")
    print(json.dumps({name: {key: round(value, 2) for key, value in row.items()} for name, row in result.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
