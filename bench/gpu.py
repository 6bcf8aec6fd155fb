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
5. ``graph_decode`` (issue 24): today's eager decode against the static-shape step replayed as
   CUDA graphs (``model/cuda/``), paired in one process on the same card, for Tiny bf16, Tiny NF4
   and Small NF4 on an emulated 8 GiB card (each configuration in a process of its own): tokens/s
   through the app's generation path and in a bare loop, time to first token, capture time, the
   decoder's and the graphs' extra memory, and whether the answers are the same.
6. ``label`` (issue 23): labelling throughput on the card, batched against one query at a time
   (``bench.label``: full-size Tiny NF4, 16 images × 2 phrases, 16 queries a batch).

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
from model.environment import read

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
        "checkpoints": read("VL2_BENCH_CACHE", ""),
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


GRAPH_CONFIGS = ("tiny:bf16:0", "tiny:nf4:8", "small:nf4:8")


def parse_graph_config(spec: str) -> tuple[str, str, float | None]:
    """``variant:precision[:GiB]`` (GiB of the emulated card; 0 or left out: the whole card)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{spec!r}: write a configuration as variant:precision[:GiB], e.g. small:nf4:8")
    variant, precision = parts[0], parts[1]
    if variant not in ("tiny", "small", "base"):
        raise ValueError(f"{spec!r}: the variant is one of tiny, small, base")
    if precision not in ("bf16", "nf4", "fp32"):
        raise ValueError(f"{spec!r}: the precision is one of bf16, nf4, fp32")
    gib = float(parts[2]) if len(parts) == 3 else 0.0
    if gib < 0:
        raise ValueError(f"{spec!r}: the card's memory cannot be negative")
    return variant, precision, gib or None


def graph_decode(
    variant: str,
    precision: str,
    emulate_gib: float | None,
    new_tokens: int,
    *,
    rounds: int = 3,
    full_size: bool = True,
    device: str = "cuda",
) -> dict:
    """Today's decode against the static-shape step (``model/cuda/``) on the same loaded model,
    paired round by round (the order alternating): through the app's generation path (greedy,
    the app's repetition penalty, ``new_tokens`` tokens) and in a bare greedy loop; plus the
    decoder's build and capture time, its memory, and whether both give the same answers. On a
    CPU (a dry run) the static step runs uncaptured."""
    import torch

    from bench.__main__ import PRECISIONS, _sync, _to_device, build, without_reuse
    from model.cuda import StaticDecoder, attach, capture_graphs, detach
    from model.loading import load_model
    from model.processing import Message

    place = torch.device(device)
    on_gpu = place.type == "cuda"
    path = build(variant, full_size=full_size, device=device)
    budget = None
    if on_gpu:
        total = torch.cuda.get_device_properties(place).total_memory
        if emulate_gib:
            torch.cuda.set_per_process_memory_fraction(emulate_gib * GIB / total, place.index or 0)
            budget = f"{emulate_gib}GiB"
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(place)
    dtype, quantization = PRECISIONS[precision]
    start = time.perf_counter()
    loaded = load_model(path, device=device, dtype=dtype, quantization=quantization, gpu_memory=budget)
    without_reuse(loaded)
    _sync(place)
    load_s = time.perf_counter() - start
    print(f"loaded in {load_s:.1f} s: {loaded.info.summary()}; {loaded.info.placement}", file=sys.stderr, flush=True)
    model, processor, language = loaded.model, loaded.processor, loaded.model.language
    special = processor.special
    conversation = [Message("user", GROUNDING_QUERY, [test_image()])]
    inputs = _to_device(processor(conversation), place)
    mask = inputs["attention_mask"].long()
    chunk = model.prefill_chunk_size
    timed_answer(loaded, conversation, 2)  # warm-up of today's path

    def allocated() -> int:
        return torch.cuda.memory_allocated(place) if on_gpu else 0

    before = allocated()
    start = time.perf_counter()
    decoder = StaticDecoder(language, max_batch=1)
    _sync(place)
    build_s = time.perf_counter() - start
    decoder_bytes = allocated() - before
    runner = capture_graphs(decoder) if on_gpu else None
    captured = runner.stats if runner else None
    print(f"decoder built in {build_s:.1f} s; captured: {captured}", file=sys.stderr, flush=True)

    def use(static: bool) -> None:
        if static:
            attach(language, decoder)
            model.new_cache = decoder.new_cache  # generate() and the chunked prefill take it
        else:
            detach(language)
            vars(model).pop("new_cache", None)

    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(
            inputs["input_ids"], inputs["pixel_values"], inputs["images_seq_mask"], inputs["images_spatial_crop"]
        )

    def prefill_stock():
        cache = model.new_cache()
        length = embeds.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        for first in range(0, length, chunk or length):
            end = min(first + (chunk or length), length)
            piece = embeds[:, first:end]
            out = language(inputs_embeds=piece, attention_mask=mask[:, :end], position_ids=positions[:, first:end],
                           cache=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
        return cache, out.logits[:, -1]

    @torch.inference_mode()
    def bare(kind: str, keep: bool = False, forced: list | None = None) -> tuple[float, list, list]:
        """Greedy ``new_tokens`` steps after the prompt (fed ``forced`` tokens instead, if given);
        tokens/s, the tokens fed, and with ``keep`` the logits (the comparison; not timed)."""
        if kind == "eager":
            use(False)
            cache, logits = prefill_stock()
        else:
            use(True)
            decoder.runner = runner if kind == "graph" else None
            logits = decoder.prefill(inputs_embeds=embeds, attention_mask=mask, chunk_size=chunk)
        token = logits.argmax(-1).view(1, 1)
        fed, kept = [], []
        _sync(place)
        begin = time.perf_counter()
        for index in range(new_tokens):
            token = forced[index] if forced is not None else token
            fed.append(token)
            if kind == "eager":
                logits = language(input_ids=token, cache=cache, use_cache=True).logits[:, -1]
            else:
                logits = decoder.step(token)
            if keep:
                kept.append(logits.float().clone())
            token = logits.argmax(-1).view(1, 1)
        _sync(place)
        seconds = time.perf_counter() - begin
        decoder.runner = runner
        return new_tokens / seconds, fed, kept

    # Same answers: through model.generate with the app's penalty, and logits teacher-forced.
    answers = {}
    for static in (False, True):
        use(static)
        with torch.inference_mode():
            answers[static] = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                             do_sample=False, repetition_penalty=1.1, eos_token_id=special.eos,
                                             pad_token_id=special.pad)  # fmt: skip
    same = answers[False].shape == answers[True].shape and bool((answers[False] == answers[True]).all())
    differing = (answers[False] != answers[True]).nonzero()
    _, fed, stock_logits = bare("eager", keep=True)  # fed: the eager path's greedy tokens
    _, _, static_logits = bare("graph" if on_gpu else "static", keep=True, forced=fed)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(static_logits, stock_logits, strict=True)]
    pairs = zip(static_logits, stock_logits, strict=True)
    argmax_same = sum(int(torch.equal(a.argmax(-1), b.argmax(-1))) for a, b in pairs)

    samples: dict[str, list[float]] = {}
    kinds = ("eager", "graph") if on_gpu else ("eager", "static")
    for index in range(rounds):
        for kind in kinds if index % 2 == 0 else kinds[::-1]:
            use(kind != "eager")
            first = timed_answer(loaded, conversation, 1)[0]
            whole = timed_answer(loaded, conversation, new_tokens)[0]
            samples.setdefault(f"{kind}_ttft_s", []).append(first)
            if whole > first:  # a short answer on a noisy machine can take less than the median first token
                samples.setdefault(f"{kind}_generate_tokens_per_s", []).append((new_tokens - 1) / (whole - first))
            samples.setdefault(f"{kind}_bare_tokens_per_s", []).append(bare(kind)[0])
            if kind == "graph":  # the uncaptured static step too: what the graphs add on their own
                samples.setdefault("static_bare_tokens_per_s", []).append(bare("static")[0])
    use(False)
    result = {
        "config": f"{variant}{'' if full_size else ' (reduced)'}/{precision} on {emulate_gib or device}",
        "load_s": round(load_s, 1),
        "placement": loaded.info.placement,
        "prompt_tokens": int(embeds.shape[1]),
        "new_tokens": new_tokens,
        "rounds": rounds,
        **{key: round(statistics.median(values), 3) for key, values in samples.items()},
        "decoder_build_s": round(build_s, 2),
        "capture_s": round(runner.stats.total_seconds, 2) if runner else None,
        "graphs": runner.stats.graphs if runner else 0,
        "graph_pool_mib": round(runner.stats.pool_bytes / 2**20, 1) if runner else 0,
        "decoder_extra_mib": round(decoder_bytes / 2**20, 1),
        **{f"decoder_{key.removesuffix('_bytes')}_mib": round(b / 2**20, 1) for key, b in decoder.memory().items()},
        "experts_eager": {str(k): v for k, v in decoder.elsewhere.items()},
        "answers_identical": same,
        "first_difference": int(differing[0, 1]) if len(differing) else None,
        "teacher_forced_max_rel_error": round(max(errors), 5),
        "teacher_forced_argmax_same": f"{argmax_same}/{len(errors)}",
    }
    for measure in ("generate_tokens_per_s", "bare_tokens_per_s"):
        eager, fast = result.get(f"eager_{measure}"), result.get(f"{kinds[1]}_{measure}")
        if eager and fast:
            result[f"{measure.removesuffix('_tokens_per_s')}_speedup"] = round(fast / eager, 3)
    if on_gpu:
        used = total - torch.cuda.mem_get_info(place)[0]
        outside_allocator = max(0, used - torch.cuda.memory_reserved(place))
        peak = torch.cuda.max_memory_reserved(place) + outside_allocator
        result.update(
            gpu=torch.cuda.get_device_name(place),
            cuda_max_allocated_gib=round(torch.cuda.max_memory_allocated(place) / GIB, 2),
            peak_gpu_gib=round(peak / GIB, 2),
        )
        if emulate_gib:
            result["within_budget"] = peak <= emulate_gib * GIB
    return result


def graph_decode_each(
    specs: list[str], new_tokens: int, rounds: int, deadline: float, reduced: bool, device: str
) -> dict:
    """:func:`graph_decode` for each configuration, each in a process of its own (an emulated
    card's memory limit is per process), within ``deadline`` seconds in all."""
    started = time.perf_counter()
    results = {}
    for spec in specs:
        left = deadline - (time.perf_counter() - started)
        if left < 20:
            results[spec] = {"error": "skipped: the deadline was reached"}
            continue
        argv = ["graph", spec, "--new-tokens", str(new_tokens), "--rounds", str(rounds), "--device", device]
        argv += ["--reduced"] if reduced else []
        results[spec] = _step(f"graph {spec}", argv, left)
    return results


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
    # Issue 24: eager decode against CUDA-graph decode, paired, three configurations.
    "graph_decode": (["graph", *GRAPH_CONFIGS, "--deadline", "530"], 540),
    # Issue 23: labelling throughput, batched against one query at a time (bench.label).
    "label": (["label", "--full-size", "--device", "cuda", "--precision", "nf4", "--batch-size", "16"], 300),
}


def drive(out: Path, deadline: float, steps: list[str]) -> int:
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    roomy = RAM_DISK.is_dir() and shutil.disk_usage(RAM_DISK).free > RAM_DISK_NEEDED
    if read("VL2_BENCH_CACHE") is None and roomy:
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
    graph = sub.add_parser("graph", help="eager against CUDA-graph decode (one process per configuration)")
    graph.add_argument("configs", nargs="+", metavar="VARIANT:PRECISION[:GiB]", help=f"e.g. {' '.join(GRAPH_CONFIGS)}")
    graph.add_argument("--new-tokens", type=int, default=32)
    graph.add_argument("--rounds", type=int, default=3)
    graph.add_argument("--deadline", type=float, default=530, help="seconds for all configurations together")
    graph.add_argument("--device", default="cuda", help="cpu: a dry run (the static step uncaptured)")
    graph.add_argument("--reduced", action="store_true", help="the small generated checkpoints, not full size")
    from bench.label import build_parser as label_parser

    sub.add_parser("label", parents=[label_parser()], add_help=False, help="labelling throughput (bench.label)")
    harness = sub.add_parser("harness")
    harness.add_argument("json_out")
    args = parser.parse_args(argv)
    if args.step is None:
        return drive(Path(args.out), args.deadline, args.steps)
    if args.step == "label":
        from bench.label import measure

        print(json.dumps(measure(args)))
        return 0
    if args.step == "harness":
        from bench.__main__ import main as bench_main

        status = bench_main(["--device", "cuda", "--full-size", "--variants", "tiny", "--precisions", "bf16", "nf4",
                             "--rounds", "3", "--out", args.json_out])  # fmt: skip
        rows = json.loads(Path(args.json_out).read_text())["rows"]
        keys = ("config", "weights_gb", "load_s", "cuda_max_allocated_gb", "cuda_max_reserved_gb", "vision_per_tile_s",
                "embeds_s", "prefill_s", "decode_ms_per_token", "logit_error")  # fmt: skip
        print(json.dumps({"rows": [{key: row.get(key) for key in keys} for row in rows]}))
        return status
    if args.step == "graph":
        configs = [parse_graph_config(spec) for spec in args.configs]  # bad input fails here, before any work
        if len(configs) > 1:
            result = graph_decode_each(
                args.configs, args.new_tokens, args.rounds, args.deadline, args.reduced, args.device
            )
            print(json.dumps(result))
            return 0 if all("error" not in value for value in result.values()) else 1
        variant, precision, gib = configs[0]
        result = compute_thread.run(
            graph_decode,
            variant,
            precision,
            gib if args.device.startswith("cuda") else None,
            args.new_tokens,
            rounds=args.rounds,
            full_size=not args.reduced,
            device=args.device,
        )
    elif args.step == "environment":
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
