"""The GPU check: one prepared command for a lent GPU machine, within a deadline.

    python -m bench.gpu --out DIR [--deadline 540] [--steps STEP ...]

Steps, most important first; each runs in a process of its own under what is left of the
deadline, so a failure or a slow step costs only itself. Everything lands in ``DIR/gpu.json``
(the harness's own table in ``DIR/tiny.json``); each step's output goes to stdout.

1. ``environment``: versions, the card, free memory and the RAM disk the checkpoints use.
2. ``checkpoint tiny`` / ``checkpoint small``: full-size random-weight checkpoints in the official
   layout, drawn on the GPU (Small's 16 B weights take minutes on a CPU).
3. ``answer`` on an emulated 8 GiB card (``torch.cuda.set_per_process_memory_fraction`` and the
   loader's ``gpu_memory`` budget): Tiny NF4, then Small NF4 with the experts that do not fit
   computed on the CPU. Each loads through ``load_model``, answers a grounding query about a
   1024×768 image through the app's generation path (``model.generation``), and reports the load
   time, the placement, time to first token, decode tokens/s at a fixed length and the peak GPU
   memory (the allocator's maximum plus what the CUDA context holds outside it).
4. The harness (``python -m bench --device cuda``) for Tiny in bf16 and NF4: per-configuration
   CUDA peaks, load, vision, time-to-first-token phases, decode ms/token and logit error.

Random weights: speeds and bytes are meaningful, answers are not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from model import compute_thread

GIB = 2**30
# Full-size Small is 32 GB of bf16: a RAM disk avoids waiting on a slow disk's write-back.
RAM_DISK = Path("/dev/shm")
RAM_DISK_NEEDED = 45e9
GROUNDING_QUERY = "<|ref|>the blue square<|/ref|>."


def environment() -> dict:
    import torch
    import transformers

    report = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "checkpoints": os.environ.get("VL2_BENCH_CACHE", ""),
    }
    try:
        import bitsandbytes

        report["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # the check reports it; the quantized steps then fail with the reason
        report["bitsandbytes"] = f"unusable: {exc}"
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report.update(gpu=torch.cuda.get_device_name(), gpu_total_gib=round(total / GIB, 1))
        report["gpu_free_gib"] = round(free / GIB, 1)
    return report


def checkpoint(variant: str, full_size: bool = True, device: str = "cuda") -> dict:
    from bench.__main__ import build

    start = time.perf_counter()
    path = build(variant, full_size=full_size, device=device)
    size = sum(file.stat().st_size for file in path.glob("*.safetensors"))
    return {"path": str(path), "gb": round(size / 1e9, 2), "seconds": round(time.perf_counter() - start, 1)}


def test_image():
    """A 1024×768 photo-sized image with something to point at (random weights will not find it)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1024, 768), (200, 190, 170))
    ImageDraw.Draw(image).rectangle((600, 200, 850, 450), fill=(30, 60, 200))
    return image


def timed_answer(loaded, conversation: list, tokens: int, penalty: float = 1.1) -> tuple[float, str]:
    """Seconds and text of a greedy answer of exactly ``tokens`` tokens through the app's
    generation path (``model.generation.generate_text``), the GPU's queue drained at both ends."""
    from bench.__main__ import _device, _sync
    from model.generation import GenerationSettings, generate_text

    settings = GenerationSettings(
        max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0, repetition_penalty=penalty
    )
    device = _device(loaded)
    _sync(device)
    start = time.perf_counter()
    text = generate_text(loaded.model, loaded.processor, conversation, settings)
    _sync(device)
    return time.perf_counter() - start, text


def budget_offloading(path: Path, groups: int, precision: str) -> int:
    """A GPU budget in bytes that leaves the routed experts of ``groups`` MoE layers on the CPU:
    exercises the hybrid path with a checkpoint small enough to fit anywhere."""
    from bench.__main__ import PRECISIONS
    from model.configuration import load_official_config
    from model.loading import parse_dtype, plan_before_loading

    dtype, quantization = PRECISIONS[precision]
    everything = plan_before_loading(load_official_config(path), 2**62, parse_dtype(dtype, "cuda"), quantization)
    kept = sorted(everything.group_bytes)[groups:]
    on_gpu = everything.resident_bytes + sum(everything.group_bytes[layer] for layer in kept)
    # Room for the estimate's rounding: half a group, so that the next group still does not fit.
    return on_gpu + everything.reserve_bytes + min(everything.group_bytes.values()) // 2


def answer(
    variant: str,
    precision: str,
    emulate_gib: float | None,
    new_tokens: int,
    *,
    repeats: int = 3,
    full_size: bool = True,
    device: str = "cuda",
    offload_groups: int = 0,
) -> dict:
    """Load ``variant`` (on a GPU: under an emulated ``emulate_gib`` card, or with a budget that
    offloads ``offload_groups`` MoE layers' experts) and answer a grounding query."""
    import torch

    from bench.__main__ import PRECISIONS, _sync, build, without_reuse
    from model.grounding import parse_grounding
    from model.loading import load_model
    from model.processing import Message

    place = torch.device(device)
    on_gpu = place.type == "cuda"
    path = build(variant, full_size=full_size, device=device)
    budget: str | int | None = None
    if on_gpu:
        total = torch.cuda.get_device_properties(place).total_memory
        if emulate_gib:
            torch.cuda.set_per_process_memory_fraction(emulate_gib * GIB / total, place.index or 0)
            budget = f"{emulate_gib}GiB"
        elif offload_groups:
            budget = budget_offloading(path, offload_groups, precision)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(place)
    dtype, quantization = PRECISIONS[precision]
    start = time.perf_counter()

    def phase(message: str) -> None:  # where the load's time goes, to stderr
        print(f"{time.perf_counter() - start:6.1f} s  {message}", file=sys.stderr, flush=True)

    loaded = load_model(path, device=device, dtype=dtype, quantization=quantization, gpu_memory=budget, progress=phase)
    without_reuse(loaded)
    _sync(place)
    load_s = time.perf_counter() - start
    print(f"loaded in {load_s:.1f} s: {loaded.info.summary()}; {loaded.info.placement}", file=sys.stderr, flush=True)
    image = test_image()
    conversation = [Message("user", GROUNDING_QUERY, [image])]
    timed_answer(loaded, conversation, 2)  # warm-up: kernels, allocator, the CPU share's first calls
    print("warm", file=sys.stderr, flush=True)
    first_token = [timed_answer(loaded, conversation, 1)[0] for _ in range(repeats)]
    whole, text = timed_answer(loaded, conversation, new_tokens)
    ttft = statistics.median(first_token)
    result = {
        "config": f"{variant}{'' if full_size else ' (reduced)'}/{precision} on {emulate_gib or budget or device}",
        "load_s": round(load_s, 1),
        "placement": loaded.info.placement,
        "cpu_compute": loaded.info.compute,
        "weights_gib": round(loaded.info.total_bytes / GIB, 2),
        "ttft_s": round(ttft, 3),
        "ttft_samples_s": [round(value, 3) for value in first_token],
        "decode_tokens_per_s": round((new_tokens - 1) / max(1e-9, whole - ttft), 2),
        "new_tokens": new_tokens,
        "answer_head": text[:160],
        "boxes": len(parse_grounding(text, *image.size).boxes),
    }
    if on_gpu:
        used = total - torch.cuda.mem_get_info(place)[0]
        # The CUDA context and library workspaces sit outside the allocator; add them to its peak.
        outside_allocator = max(0, used - torch.cuda.memory_reserved(place))
        peak = torch.cuda.max_memory_reserved(place) + outside_allocator
        result.update(
            cuda_max_allocated_gib=round(torch.cuda.max_memory_allocated(place) / GIB, 2),
            cuda_max_reserved_gib=round(torch.cuda.max_memory_reserved(place) / GIB, 2),
            outside_allocator_gib=round(outside_allocator / GIB, 2),
            peak_gpu_gib=round(peak / GIB, 2),
        )
        if emulate_gib:
            result["within_budget"] = peak <= emulate_gib * GIB
    return result


def profile_decode(variant: str, precision: str, new_tokens: int, device: str = "cuda", full_size: bool = True) -> dict:
    """Where a generated token's time goes: the app's generation path (with and without the
    repetition penalty) against a bare decode loop over the same model, and a profile of the
    app's path (the top operators to stderr)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.__main__ import PRECISIONS, _sync, _to_device, build, without_reuse
    from model.loading import load_model
    from model.processing import Message

    place = torch.device(device)
    dtype, quantization = PRECISIONS[precision]
    loaded = load_model(build(variant, full_size, device), device=device, dtype=dtype, quantization=quantization)
    without_reuse(loaded)
    model, processor = loaded.model, loaded.processor
    conversation = [Message("user", GROUNDING_QUERY, [test_image()])]

    def generated(tokens: int, penalty: float) -> float:
        return timed_answer(loaded, conversation, tokens, penalty)[0]

    result = {}
    for penalty in (1.1, 1.0):
        generated(2, penalty)
        one, many = generated(1, penalty), generated(new_tokens, penalty)
        result[f"generate_penalty{penalty}_ms_per_token"] = round(1e3 * (many - one) / (new_tokens - 1), 2)
    inputs = _to_device(processor(conversation), place)
    with torch.inference_mode():
        cache = model.new_cache()
        out = model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(new_tokens):
            _sync(place)
            start = time.perf_counter()
            token = model.language(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            _sync(place)
            steps.append(time.perf_counter() - start)
    result["bare_loop_ms_per_token"] = round(1e3 * statistics.median(steps[2:]), 2)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if place.type == "cuda" else [])
    with profile(activities=activities) as trace:
        generated(8, 1.1)
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48),
          file=sys.stderr)  # fmt: skip
    result["config"] = f"{variant}/{precision} on {device}"
    return result


def _step(name: str, argv: list[str], seconds: float) -> dict:
    """Run one step in a process of its own; its last JSON line is the result."""
    print(f"== {name} ({seconds:.0f} s left for it)", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.gpu", *argv], capture_output=True, text=True, timeout=max(1.0, seconds)
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        print(tail, flush=True)
        return {"error": f"timed out after {seconds:.0f} s", "stderr_tail": tail}
    print(done.stdout[-4000:], done.stderr[-6000:], sep="\n", flush=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1], "rc": done.returncode}
    result = json.loads(lines[-1])
    result["step_s"] = round(time.perf_counter() - start, 1)
    return result


# name: (arguments of ``python -m bench.gpu``, the most seconds it may take). In the default order.
STEPS = {
    "tiny-profile": (["profile", "tiny", "bf16"], 120),
    "environment": (["environment"], 60),
    "tiny-checkpoint": (["checkpoint", "tiny"], 150),
    # The hybrid GPU+CPU path on a small checkpoint first: seconds, where full-size Small takes minutes.
    "hybrid-smoke": (["answer", "small", "nf4", "--reduced", "--offload-groups", "1", "--new-tokens", "8"], 90),
    "tiny-nf4-8gib": (["answer", "tiny", "nf4", "--gib", "8"], 150),
    "tiny-bf16": (["answer", "tiny", "bf16", "--gib", "0"], 150),
    "tiny-harness": (["harness", "{out}/tiny.json"], 400),
    "small-checkpoint": (["checkpoint", "small"], 240),
    "small-nf4-8gib": (["answer", "small", "nf4", "--gib", "8"], 360),
}


def drive(out: Path, deadline: float, steps: list[str]) -> int:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    roomy = RAM_DISK.is_dir() and shutil.disk_usage(RAM_DISK).free > RAM_DISK_NEEDED
    if "VL2_BENCH_CACHE" not in os.environ and roomy:
        os.environ["VL2_BENCH_CACHE"] = str(RAM_DISK / "vl2-bench-checkpoints")
    plan = [(name, *STEPS[name]) for name in steps]
    results: dict[str, dict] = {}
    for name, argv, cap in plan:
        left = deadline - (time.perf_counter() - started)
        if left < 20:
            results[name] = {"error": "skipped: the deadline was reached"}
            continue
        results[name] = _step(name, [part.format(out=out) for part in argv], min(cap, left))
        (out / "gpu.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0 if all("error" not in result for result in results.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/results/gpu")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for all steps together")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS), metavar="STEP")
    sub = parser.add_subparsers(dest="step")
    sub.add_parser("environment")
    make = sub.add_parser("checkpoint")
    make.add_argument("variant", choices=["tiny", "small", "base"])
    ask = sub.add_parser("answer")
    ask.add_argument("variant", choices=["tiny", "small", "base"])
    ask.add_argument("precision", choices=["bf16", "nf4", "int8"])
    ask.add_argument("--gib", type=float, default=8.0, help="the emulated card's memory (0: the whole card)")
    ask.add_argument("--new-tokens", type=int, default=32)
    ask.add_argument("--device", default="cuda", help="cpu: a dry run of this step where there is no GPU")
    ask.add_argument("--reduced", action="store_true", help="the small generated checkpoint, not full size")
    ask.add_argument(
        "--offload-groups", type=int, default=0, help="no emulation: a budget leaving N layers' experts on the CPU"
    )
    trace = sub.add_parser("profile")
    trace.add_argument("variant", choices=["tiny", "small", "base"])
    trace.add_argument("precision", choices=["bf16", "nf4", "int8"])
    trace.add_argument("--new-tokens", type=int, default=24)
    trace.add_argument("--device", default="cuda", help="cpu: a dry run of this step where there is no GPU")
    trace.add_argument("--reduced", action="store_true", help="the small generated checkpoint, not full size")
    harness = sub.add_parser("harness")
    harness.add_argument("json_out")
    args = parser.parse_args(argv)
    if args.step is None:
        return drive(Path(args.out), args.deadline, args.steps)
    if args.step == "harness":
        from bench.__main__ import main as bench_main

        status = bench_main(["--device", "cuda", "--full-size", "--variants", "tiny", "--precisions", "bf16", "nf4",
                             "--rounds", "3", "--out", args.json_out])  # fmt: skip
        rows = json.loads(Path(args.json_out).read_text())["rows"]
        keys = ("config", "weights_gb", "load_s", "cuda_max_allocated_gb", "cuda_max_reserved_gb", "vision_per_tile_s",
                "embeds_s", "prefill_s", "decode_ms_per_token", "logit_error")  # fmt: skip
        print(json.dumps({"rows": [{key: row.get(key) for key in keys} for row in rows]}))
        return status
    if args.step == "environment":
        result = environment()
    elif args.step == "profile":
        profiled = (args.variant, args.precision, args.new_tokens, args.device, not args.reduced)
        result = compute_thread.run(profile_decode, *profiled)
    elif args.step == "checkpoint":
        result = checkpoint(args.variant)
    else:
        gib = args.gib if args.device.startswith("cuda") and not args.offload_groups else None
        result = compute_thread.run(
            answer,
            args.variant,
            args.precision,
            gib,
            args.new_tokens,
            full_size=not args.reduced,
            device=args.device,
            offload_groups=args.offload_groups,
        )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
