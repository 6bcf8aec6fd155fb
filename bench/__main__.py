"""Benchmark harness: memory, load, vision, time-to-first-token phases and decode, per variant × precision.

    python -m bench --quick                       # small generated checkpoints, a smoke run (< 5 min)
    python -m bench --variants tiny --full-size   # real dimensions (Tiny: 6.7 GB checkpoint, built once)
    python -m bench --device cuda --gpu-memory 8GiB --variants small --precisions nf4 --full-size

Protocol: machine floors first (GEMM GFLOP/s in fp32 and bf16, memory read bandwidth). Then each
configuration is loaded once in a process of its own, to measure its peak memory (the maximum RSS
of a process never goes down) and each phase's peak, with the bounds on activations and without
them (bench/memory.py says how a phase's peak is measured exactly). Timing happens in one process:
configurations are loaded once, then measured in interleaved rounds with the order rotated each
round; medians reported, with an A/A control (the first configuration measured twice) as the noise
floor and CPU time beside wall time. Prefill is reported against the GEMM floor of the dtype it
multiplies in, decode against the bandwidth floor for the bytes a step reads (weights and cache);
the floors are measured again in every round beside the work, each ratio is taken within its round
and the median reported, since a shared machine's bandwidth drifts; vision and prefill each get the
GEMM floor measured again just before them, and decode steps are each paired with one read of the
floor's tensor timed just before them, since both drift within seconds.
Random weights: speeds and bytes are meaningful, answers are not.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from model import compute_thread
from model.cpu.decode import TinyDecodeStep, step_graphs, warm_up
from model.cpu.kernels import CpuLinear
from model.cpu.native import NativeDecodeStep
from model.environment import read
from model.loading import LoadedModel, load_model
from model.processing import Message
from model.testing import make_checkpoint, official_config, official_tensor_shapes

from .memory import PeakMemory, fixed_mmap_threshold, max_rss_bytes, rss_bytes

# Where generated checkpoints are kept between runs (full-size Small is 32 GB: a RAM disk may be faster).
CACHE = Path(read("VL2_BENCH_CACHE") or Path(tempfile.gettempdir()) / "vl2-bench-checkpoints")
PRECISIONS = {"fp32": ("fp32", None), "bf16": ("bf16", None), "nf4": ("bf16", "4bit"), "int8": ("bf16", "8bit")}
MB = 1e6
# The long prompt of the memory runs: near Tiny's and Small's 4,096-token context.
LONG_PROMPT_TOKENS = 4000
SHARD_BYTES = 4e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(work, seconds: float) -> float:
    """Calls per second of ``work`` over about ``seconds`` (after one warm-up call)."""
    work()
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        work()
        count += 1
    return count / elapsed


GEMM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gemm_floor_gflops(device: torch.device, dtype: str, seconds: float) -> float:
    """The GEMM floor: GFLOP/s of one large square product (2048 on a CPU, 8192 on a GPU)."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, dtype=GEMM_DTYPES[dtype], device=device)
    b = torch.randn(size, size, dtype=GEMM_DTYPES[dtype], device=device)

    def gemm():
        torch.nn.functional.linear(a, b)
        _sync(device)

    return round(_rate(gemm, seconds) * 2 * size**3 / 1e9, 1)


def machine_floors(device: torch.device, seconds: float = 0.3) -> dict[str, float]:
    floors = {f"{name}_gemm_gflops": gemm_floor_gflops(device, name, seconds) for name in GEMM_DTYPES}
    source = read_source(device)

    def read():
        source.sum()
        _sync(device)

    floors["memory_read_gb_per_s"] = round(_rate(read, seconds) * source.numel() * 4 / 1e9, 1)
    return floors


def read_source(device: torch.device) -> torch.Tensor:
    """What the bandwidth floor reads: far larger than any cache (256 MB on a CPU, 2 GB on a GPU)."""
    return torch.ones(64 * 2**20 if device.type == "cpu" else 512 * 2**20, device=device)


def read_once_gb_per_s(source: torch.Tensor) -> float:
    """One timed read of ``source``: the bandwidth floor at this moment."""
    _sync(source.device)
    start = time.perf_counter()
    source.sum()
    _sync(source.device)
    return source.numel() * source.element_size() / (time.perf_counter() - start) / 1e9


@dataclass(frozen=True)
class Costs:
    """What a configuration's phases must at least do, to compare against the machine's floors."""

    prefill_macs_per_token: float
    attention_macs_per_pair: float  # per (query, key) pair, all layers: scores and weighted sum
    decode_step_bytes: float
    prefill_dtype: str
    vision_macs_per_tile: float
    vision_dtype: str

    @classmethod
    def of(cls, model: torch.nn.Module) -> Costs:
        macs, step_bytes = step_costs(model)
        vision_dtype = "fp32" if model.vision.embeddings.patch_embedding.weight.dtype == torch.float32 else "bf16"
        attention = attention_macs_per_pair(model.config.text_config)
        return cls(macs, attention, step_bytes, prefill_dtype(model), vision_macs_per_tile(model), vision_dtype)

    def prefill_floor_s(self, tokens: float, floors: dict[str, float]) -> float:
        """The weights' products for every token plus causal attention over tokens·(tokens+1)/2 pairs."""
        macs = self.prefill_macs_per_token * tokens + self.attention_macs_per_pair * tokens * (tokens + 1) / 2
        return 2 * macs / (floors[f"{self.prefill_dtype}_gemm_gflops"] * 1e9)

    def vision_floor_s(self, floors: dict[str, float]) -> float:
        return 2 * self.vision_macs_per_tile / (floors[f"{self.vision_dtype}_gemm_gflops"] * 1e9)

    def decode_floor_ms(self, floors: dict[str, float], cache_bytes: float) -> float:
        """Reading the step's weights and the keys and values it attends over, at the read floor."""
        return 1e3 * (self.decode_step_bytes + cache_bytes) / (floors["memory_read_gb_per_s"] * 1e9)


@dataclass
class Config:
    name: str
    loaded: LoadedModel
    load_seconds: float
    samples: dict[str, list[float]] = field(default_factory=dict)
    costs: Costs = field(init=False)
    # --compare-decoders on a model with the native step: the compiled step beside it, made once.
    compiled_step: TinyDecodeStep | None = None

    def __post_init__(self) -> None:
        self.costs = Costs.of(self.loaded.model)

    def record(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def build(variant: str, full_size: bool, device: str = "cpu") -> Path:
    """The variant's random-weight checkpoint, made once (drawn on ``device`` when it is a GPU)."""
    path = CACHE / f"{variant}{'-full' if full_size else ''}"
    if not (path / "model.safetensors.index.json").exists():
        shapes = official_tensor_shapes(official_config(variant, full_size=full_size))
        bf16_bytes = 2 * sum(math.prod(shape) for shape in shapes.values())
        # Shards of at most about 4 GB, as the hub's: making one holds it whole in memory.
        shards = max(1, math.ceil(bf16_bytes / SHARD_BYTES))
        draw_on = device if torch.device(device).type == "cuda" else "cpu"
        make_checkpoint(path, variant, full_size=full_size, shards=shards, device=draw_on)
    return path


def without_reuse(loaded: LoadedModel) -> LoadedModel:
    """The benchmarks time the work itself in every round, so nothing is carried from one request
    to the next (vision features, conversation prefixes); ``bench.reuse`` measures what that saves."""
    loaded.model.vision_cache = loaded.model.prefix_cache = None
    return loaded


def load(name: str, path: Path, precision: str, device: str, gpu_memory: str | None) -> Config:
    dtype, quantization = PRECISIONS[precision]
    start = time.perf_counter()
    loaded = load_model(path, device=device, dtype=dtype, quantization=quantization, gpu_memory=gpu_memory)
    without_reuse(loaded)
    with torch.inference_mode():  # the first forward belongs to the load (lazy weights, kernels)
        loaded.model(input_ids=torch.tensor([[loaded.processor.special.bos]], device=_device(loaded)))
    _sync(_device(loaded))
    return Config(name, loaded, time.perf_counter() - start)


def _device(loaded: LoadedModel) -> torch.device:
    return loaded.model.get_input_embeddings().weight.device


def _to_device(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def phase_gemm_floor(config: Config, phase: str, dtype: str) -> dict[str, float]:
    """The ``dtype`` GEMM floor measured now (recorded as ``{phase}_floor_gemm_gflops``), as a
    floors entry."""
    gflops = gemm_floor_gflops(_device(config.loaded), dtype, seconds=0.15)
    config.record(f"{phase}_floor_gemm_gflops", gflops)
    return {f"{dtype}_gemm_gflops": gflops}


def measure(
    config: Config, image: Image.Image, decode_tokens: int, chunk: int, compare_decoders: bool, peaks: bool = False
) -> None:
    """One round of every phase. With ``peaks`` (the memory runs, see :func:`worker`) also each
    phase's memory peak, and the same for the vision tiles in one batch and a long prompt's
    prefill in one piece and in chunks: the peaks with and without the bounds."""
    model, processor = config.loaded.model, config.loaded.processor
    device = _device(config.loaded)
    wall, cpu = time.perf_counter(), time.process_time()

    def timed(key: str, work, peak_key: str | None = None):
        with PeakMemory(device=device) if peaks and peak_key else contextlib.nullcontext() as peak:
            _sync(device)
            start = time.perf_counter()
            result = work()
            _sync(device)
        config.record(key, time.perf_counter() - start)
        if peak is not None:
            config.record(f"{peak_key}_peak_mb", peak.delta / MB)
            if device.type == "cuda":
                config.record(f"{peak_key}_cuda_max_allocated_mb", peak.cuda_allocated / MB)
        return result

    # The floors are measured again in every round, next to the work they bound: on a shared
    # machine memory bandwidth drifts by 1.5-2x within minutes, and a ratio against a floor taken
    # at another time would measure the drift.
    floors = machine_floors(device, seconds=0.15)
    for key, value in floors.items():
        config.record(f"floor_{key}", value)

    with torch.inference_mode():
        inputs = timed("preprocess_s", lambda: processor([Message("user", "<|ref|>the object<|/ref|>.", [image])]))
        inputs = _to_device(inputs, device)
        tiles = inputs["pixel_values"][0, : 1 + int(inputs["images_spatial_crop"][0, 0].prod())]
        # The GEMM floor once more just before each phase it bounds: vision and prefill run
        # 20-40 s after the round's floors, and a GEMM's speed drifts as much as memory's.
        vision_floors = {**floors, **phase_gemm_floor(config, "vision", config.costs.vision_dtype)}
        timed("vision_s", lambda: model.encode_tiles(tiles), "vision")
        if peaks and model.vision_tiles_per_batch < tiles.shape[0]:
            timed("vision_one_batch_s", lambda: encode_in_one_batch(model, tiles), "vision_one_batch")
        config.record("vision_per_tile_s", config.samples["vision_s"][-1] / tiles.shape[0])
        vision_floor = config.costs.vision_floor_s(vision_floors)
        config.record("vision_vs_gemm_floor", config.samples["vision_per_tile_s"][-1] / vision_floor)
        args = (inputs["input_ids"], inputs["pixel_values"], inputs["images_seq_mask"], inputs["images_spatial_crop"])
        embeds = timed("embeds_s", lambda: model.prepare_inputs_embeds(*args))
        config.record("assembly_s", max(0.0, config.samples["embeds_s"][-1] - config.samples["vision_s"][-1]))
        mask = inputs["attention_mask"].long()

        def prefill():  # as generate() prefills: into the model's own cache
            return model.language(
                inputs_embeds=embeds, attention_mask=mask, cache=model.new_cache(), use_cache=True, logits_to_keep=1
            )

        prefill_floors = {**floors, **phase_gemm_floor(config, "prefill", config.costs.prefill_dtype)}
        out = timed("prefill_s", prefill, "prefill")
        timed(f"prefill_chunk{chunk}_s", lambda: model.prefill_cache(embeds, mask, chunk), f"prefill_chunk{chunk}")
        config.record("prompt_tokens", embeds.shape[1])
        if peaks:
            long_prompt_peaks(config, timed, embeds, chunk)
        prefill_floor = config.costs.prefill_floor_s(embeds.shape[1], prefill_floors)
        config.record("prefill_vs_gemm_floor", config.samples["prefill_s"][-1] / prefill_floor)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        prompt_cache_bytes = _cache_bytes(cache)
        # Each step is paired with the floor's read timed just before it: the machine's bandwidth
        # swings by 2-3x within seconds (16-50 GB/s in one run on the 2-core EPYC), so a floor
        # taken at the start of the round, half a minute earlier, mostly measured the swing.
        source, steps, step_ratios, reads = read_source(device), [], [], []
        for index in range(decode_tokens):  # a fixed length: random weights would stop at arbitrary eos
            reads.append(read_once_gb_per_s(source))
            start = time.perf_counter()
            out = model.language(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            steps.append(time.perf_counter() - start)
            step_cache_bytes = prompt_cache_bytes * (1 + index / embeds.shape[1])
            floor_ms = config.costs.decode_floor_ms({"memory_read_gb_per_s": reads[-1]}, step_cache_bytes)
            step_ratios.append(1e3 * steps[-1] / floor_ms)
        del source
        config.record("decode_ms_per_token", 1e3 * statistics.median(steps[2:] or steps))
        config.record("decode_vs_bandwidth_floor", statistics.median(step_ratios[2:] or step_ratios))
        config.record("decode_floor_read_gb_per_s", statistics.median(reads[2:] or reads))
        # A step also reads the whole cache: count it at the middle of the decoded stretch.
        cache_bytes = prompt_cache_bytes * (1 + decode_tokens / 2 / embeds.shape[1])
        config.record("decode_cache_mb", cache_bytes / MB)
        # Against the floor read at the start of the round, as this harness first reported it.
        round_floor_ms = config.costs.decode_floor_ms(floors, cache_bytes)
        config.record("decode_vs_round_floor", config.samples["decode_ms_per_token"][-1] / round_floor_ms)
        if compare_decoders and getattr(model.language, "decode_step", None) is not None:
            ratios = paired_decoders(model, cache, token, positions=8)
            config.record("decode_per_module_over_whole_step", statistics.median(ratios))
            if isinstance(model.language.decode_step, NativeDecodeStep):
                config.compiled_step = config.compiled_step or compiled_step(model.language)
                ratios = paired_decoders(model, cache, token, positions=8, other=config.compiled_step)
                config.record("decode_compiled_over_native", statistics.median(ratios))
    config.record("cpu_over_wall", (time.process_time() - cpu) / (time.perf_counter() - wall))


def encode_in_one_batch(model: torch.nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """The vision tower over all ``tiles`` at once: without the cap on tiles per batch."""
    cap = model.vision_tiles_per_batch
    model.vision_tiles_per_batch = tiles.shape[0]
    try:
        return model.encode_tiles(tiles)
    finally:
        model.vision_tiles_per_batch = cap


def long_prompt_peaks(config: Config, timed, embeds: torch.Tensor, chunk: int) -> None:
    """Prefill a prompt near the context length (the image prompt's embeddings repeated) in one
    piece and in chunks of ``chunk``; also the bytes of the cache it leaves, which both peaks hold."""
    model = config.loaded.model
    tokens = min(LONG_PROMPT_TOKENS, model.config.text_config.max_position_embeddings - 1)
    if tokens <= embeds.shape[1]:
        return
    long = embeds.repeat(1, -(-tokens // embeds.shape[1]), 1)[:, :tokens]
    mask = torch.ones(long.shape[:2], dtype=torch.long, device=long.device)
    config.record("long_prompt_tokens", tokens)
    try:
        whole = timed(
            "long_prefill_s",
            lambda: (
                model.language(
                    inputs_embeds=long, attention_mask=mask, cache=model.new_cache(), use_cache=True, logits_to_keep=1
                ).cache
            ),
            "long_prefill",
        )
    except torch.OutOfMemoryError:  # a GPU budget that only chunked prefill fits: that is the finding
        config.record("long_prefill_out_of_memory", 1.0)
        torch.cuda.empty_cache()
    else:
        config.record("long_prefill_cache_mb", _cache_bytes(whole) / MB)
        del whole
    timed(f"long_prefill_chunk{chunk}_s", lambda: model.prefill_cache(long, mask, chunk), f"long_prefill_chunk{chunk}")


def _cache_bytes(cache) -> float:
    """Bytes of the keys and values (or MLA latents) a cache holds."""
    return float(
        sum(
            tensor.numel() * tensor.element_size()
            for layer in cache.layers
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(tensor, torch.Tensor)
        )
    )


def step_costs(model: torch.nn.Module) -> tuple[float, float]:
    """(multiply-adds per prompt token, bytes one decode step reads): shared parts + the top-k experts.

    nf4 stores two weights a byte, so its weights count twice for the arithmetic. ``lm_head`` runs
    for the last prompt token only (``logits_to_keep=1``), so it is left out of the per-token work.
    """
    text = model.config.text_config
    share = text.num_experts_per_tok / text.n_routed_experts
    macs, step_bytes = 0.0, 0.0
    for name, p in model.language.named_parameters():
        if "embed_tokens" in name:
            continue
        weight = share if ".mlp.experts." in name else 1.0
        if "lm_head" not in name:
            macs += p.numel() * weight * (2 if p.dtype == torch.uint8 else 1)
        step_bytes += p.numel() * p.element_size() * weight
    return macs, step_bytes


def attention_macs_per_pair(text) -> float:
    """Multiply-adds of attention per (query, key) pair over all layers: one score (query·key)
    and one weighted value per head."""
    heads = text.num_attention_heads
    if getattr(text, "kv_lora_rank", None):  # MLA: decompressed per-head query/key and value widths
        qk, v = text.qk_nope_head_dim + text.qk_rope_head_dim, text.v_head_dim
    else:
        qk = v = getattr(text, "head_dim", None) or text.hidden_size // heads
    return float(text.num_hidden_layers * heads * (qk + v))


def vision_macs_per_tile(model: torch.nn.Module) -> float:
    """Multiply-adds of one tile through the vision tower (patch embedding, linears, attention
    scores and their weighted sums) and the projector (on the downsampled tokens)."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    macs = 2.0 * patches**2 * vision.hidden_size * vision.num_hidden_layers
    for module in model.vision.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            macs += module.weight.numel() * patches
    for module in model.projector.modules():
        if isinstance(module, torch.nn.Linear):
            macs += module.weight.numel() * model.tokens_per_tile_side**2
    return macs


def prefill_dtype(model: torch.nn.Module) -> str:
    """The dtype the language model's big products run in."""
    if any(isinstance(m, CpuLinear) and m.fp32_from_rows for m in model.language.modules()):
        return "fp32"
    return "fp32" if model.get_input_embeddings().weight.dtype == torch.float32 else "bf16"


def paired_decoders(model: torch.nn.Module, cache, token: torch.Tensor, positions: int, other=None) -> list[float]:
    """At each of ``positions`` cache positions, one step through ``other`` (``None``: the
    per-module kernels) and one through the installed whole-step decoder, alternating which goes
    first, each from the same cache position (the step's token is cropped off again); then the
    cache advances. Returns the other/installed time ratios: paired at the same position."""
    language = model.language
    whole_step = language.decode_step
    ratios = []
    try:
        for position in range(positions):
            seconds = {}
            for decoder in (whole_step, other) if position % 2 else (other, whole_step):
                language.decode_step = decoder
                start = time.perf_counter()
                language(input_ids=token, cache=cache, use_cache=True)
                seconds[decoder is other] = time.perf_counter() - start
                cache.crop(-1)
            language.decode_step = whole_step
            token = language(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            ratios.append(seconds[True] / seconds[False])
    finally:
        language.decode_step = whole_step
    return ratios


def compiled_step(language: torch.nn.Module) -> TinyDecodeStep:
    """The compiled whole step (model/cpu/decode.py) for a model that decodes with the native one,
    compiled and checked as at load."""
    step = TinyDecodeStep(language, step_graphs())
    warm_up(language, step)
    return step


def logit_error(logits: dict[str, torch.Tensor], name: str) -> tuple[float, str] | None:
    """Relative L2 error of a configuration's logits against the most precise run of the same variant."""
    variant = name.split("/")[0]
    own = logits.get(name.split(" (")[0])
    for precision in ("fp32", "bf16"):
        reference = logits.get(f"{variant}/{precision}")
        if reference is not None and own is not None:
            return round(((own - reference).norm() / reference.norm()).item(), 4), precision
    return None


def isolated_memory(args: argparse.Namespace, name: str) -> dict:
    """Load and measure one configuration in a fresh process; its peak memory as a dict."""
    command = [sys.executable, "-m", "bench", "--worker", name, "--device", args.device,
               "--prefill-chunk", str(args.prefill_chunk), "--decode-tokens", "4"]  # fmt: skip
    if args.full_size:
        command.append("--full-size")
    if args.gpu_memory:
        command += ["--gpu-memory", args.gpu_memory]
    if args.emulate_gpu_gib:
        command += ["--emulate-gpu-gib", str(args.emulate_gpu_gib)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def worker(args: argparse.Namespace) -> int:
    """A memory run: load one configuration and measure each phase's peak (bench/memory.py).

    Phases are measured twice and reported from the second time: the first also fills caches
    that stay (oneDNN keeps a compiled primitive for every new matrix shape, such as each count
    of tokens an expert gets) and reads the checkpoint's pages in. What the first time kept is
    reported on its own, as ``first_round_kept_mb``."""
    variant, precision = args.worker.split("/")
    exact = fixed_mmap_threshold()
    with PeakMemory() as load_peak:
        config = load(args.worker, build(variant, args.full_size, args.device), precision, args.device, args.gpu_memory)
    after_load = max_rss_bytes()
    image = Image.new("RGB", (1024, 768), (120, 140, 160))
    with PeakMemory(device=_device(config.loaded)) as run_peak:
        before = rss_bytes()["anon"]
        measure(config, image, args.decode_tokens, args.prefill_chunk, compare_decoders=False, peaks=True)
        kept = rss_bytes()["anon"] - before
        measure(config, image, args.decode_tokens, args.prefill_chunk, compare_decoders=False, peaks=True)
    report = {
        "load_peak_anon_gb": round(load_peak.peak_anon / 1e9, 2),
        "load_peak_file_gb": round(load_peak.peak_file / 1e9, 2),
        "peak_anon_gb": round(max(load_peak.peak_anon, run_peak.peak_anon) / 1e9, 2),
        "max_rss_after_load_gb": round(after_load / 1e9, 2),
        "max_rss_gb": round(max_rss_bytes() / 1e9, 2),
    }
    phases = {
        key: round(values[-1], 1)
        for key, values in config.samples.items()
        if key.endswith(("_peak_mb", "_cuda_max_allocated_mb", "_cache_mb", "_out_of_memory"))
        or key == "long_prompt_tokens"
    }
    # The long prompt is only run here; its times come from a process whose allocator maps every
    # block afresh (slower than a normal run), named so that they are not read as the timing runs'.
    phases.update(
        {
            f"memory_run_{key}": round(values[-1], 2)
            for key, values in config.samples.items()
            if key.startswith("long_prefill") and key.endswith("_s")
        }
    )
    report.update(phases, first_round_kept_mb=round(kept / MB, 1), glibc_mmap_threshold_fixed=exact)
    if run_peak.cuda_allocated:
        report["cuda_max_allocated_gb"] = round(run_peak.cuda_allocated / 1e9, 2)
        report["cuda_max_reserved_gb"] = round(run_peak.cuda_reserved / 1e9, 2)
    print(json.dumps(report))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small checkpoints, 2 rounds, 8 decode tokens")
    parser.add_argument("--variants", nargs="+", default=["tiny"], choices=["tiny", "small", "base"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "nf4"], choices=list(PRECISIONS))
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-memory", default=None, help="GPU budget for the loader, e.g. 8GiB")
    parser.add_argument(
        "--emulate-gpu-gib",
        type=float,
        default=None,
        help="cap PyTorch's CUDA allocator at this many GiB (a smaller card's memory; its speed is not emulated)",
    )
    parser.add_argument("--prefill-chunk", type=int, default=512, help="chunk size of the chunked-prefill column")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--no-isolated-memory", action="store_true", help="skip the one-process-per-config runs")
    parser.add_argument(
        "--compare-decoders",
        action="store_true",
        help="time CPU Tiny decode steps through the per-module kernels too (and the compiled step beside the"
        " native one), paired position by position",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="bench/results/bench.json")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 5)
    args.decode_tokens = args.decode_tokens or (8 if args.quick else 34)
    torch.manual_seed(0)
    if args.emulate_gpu_gib:
        total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
        torch.cuda.set_per_process_memory_fraction(
            args.emulate_gpu_gib * 2**30 / total, torch.device(args.device).index or 0
        )
        args.gpu_memory = args.gpu_memory or f"{args.emulate_gpu_gib}GiB"
    # Everything on the model's compute thread, where the app runs it (model/compute_thread.py).
    return compute_thread.run(worker if args.worker else run_all, args)


def run_all(args: argparse.Namespace) -> int:
    """Floors, the memory runs, the interleaved timing rounds, the table and the JSON file."""
    rounds = args.rounds
    device = torch.device(args.device)
    floors = machine_floors(device)
    print(json.dumps({"floors": floors}), flush=True)
    names = [f"{variant}/{precision}" for variant in args.variants for precision in args.precisions]
    for variant in args.variants:
        build(variant, args.full_size, args.device)
    memory = {} if args.no_isolated_memory else {name: isolated_memory(args, name) for name in names}
    configs = []
    for name in names:
        variant, precision = name.split("/")
        path = build(variant, args.full_size, args.device)
        configs.append(load(name, path, precision, args.device, args.gpu_memory))
    control = Config(f"{configs[0].name} (A/A)", configs[0].loaded, configs[0].load_seconds)
    schedule = [*configs, control]
    image = Image.new("RGB", (1024, 768), (120, 140, 160))
    for round_index in range(rounds):
        shift = round_index % len(schedule)
        for config in schedule[shift:] + schedule[:shift]:
            measure(config, image, args.decode_tokens, args.prefill_chunk, args.compare_decoders)
    # Quantization error on the same random weights: last-token logits vs the variant's fp32 run.
    probe = [Message("user", "Describe the picture.", [image.resize((384, 384))])]
    logits = {}
    with torch.inference_mode():
        for config in configs:
            inputs = _to_device(config.loaded.processor(probe), _device(config.loaded))
            logits[config.name] = config.loaded.model(**inputs).logits[0, -1].float().cpu()
    rows = []
    for config in schedule:
        median = {key: statistics.median(values) for key, values in config.samples.items()}
        median_floors = {key.removeprefix("floor_"): value for key, value in median.items() if key.startswith("floor_")}
        # The prefill floor as the ratios use it: the GEMM floor measured just before prefill.
        prefill_gemm = f"{config.costs.prefill_dtype}_gemm_gflops"
        prefill_floors = {**median_floors, prefill_gemm: median["prefill_floor_gemm_gflops"]}
        summary = config.loaded.info.weights  # measured at load, after any placement
        cache_mb = median["decode_cache_mb"]
        rows.append(
            {
                "config": config.name,
                "weights_gb": round(summary["total_bytes"] / 1e9, 3),
                "bytes_by_dtype": summary["by_dtype"],
                "bytes_by_part": {kind: entry["bytes"] for kind, entry in summary["by_kind"].items()},
                "routed_expert_dtypes": sorted(summary["by_kind"].get("routed experts", {}).get("dtypes", {})),
                "placement": config.loaded.info.placement,
                "cpu_compute": config.loaded.info.compute,
                "load_s": round(config.load_seconds, 2),
                **memory.get(config.name.removesuffix(" (A/A)"), {}),
                **{key: round(value, 4) for key, value in median.items()},
                "prefill_gemm_dtype": config.costs.prefill_dtype,
                "prefill_floor_s": round(config.costs.prefill_floor_s(median["prompt_tokens"], prefill_floors), 3),
                "decode_floor_ms": round(config.costs.decode_floor_ms(median_floors, cache_mb * MB), 2),
                **dict(zip(("logit_error", "logit_error_vs"), logit_error(logits, config.name) or (), strict=False)),
                "samples": {key: [round(value, 5) for value in values] for key, values in config.samples.items()},
            }
        )
    header = ["config", "weights_gb", "peak_anon_gb", "load_s", "vision_per_tile_s", "vision_vs_gemm_floor",
              "prefill_s", "prefill_vs_gemm_floor",
              "decode_ms_per_token", "decode_vs_bandwidth_floor", "decode_vs_round_floor",
              "decode_per_module_over_whole_step", "decode_compiled_over_native", "logit_error",
              "logit_error_vs", "cpu_over_wall"]  # fmt: skip
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row.get(key, "-")) for key in header))
    chunked = f"chunk{args.prefill_chunk}"
    peaks = ["config", "vision_peak_mb", "vision_one_batch_peak_mb", "prefill_peak_mb", f"prefill_{chunked}_peak_mb",
             "long_prompt_tokens", "long_prefill_cache_mb", "long_prefill_peak_mb",
             f"long_prefill_{chunked}_peak_mb"]  # fmt: skip
    print("phase peaks above the level before each phase (MB; memory runs: the cache a prefill builds is included)")
    print(" | ".join(peaks))
    for row in rows[: len(configs)]:
        print(" | ".join(str(row.get(key, "-")) for key in peaks))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"floors": floors, "rounds": rounds, "rows": rows}, indent=2))
    print(f"written: {out}")
    failed = {name: report["error"] for name, report in memory.items() if "error" in report}
    for name, error in failed.items():  # a smoke run that lost a column must fail, not print "-"
        print(f"isolated memory run of {name} failed: {error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
