"""Benchmark harness: memory, load, vision, time-to-first-token phases and decode, per variant × precision.

    python -m bench --quick                       # small generated checkpoints, a smoke run (< 5 min)
    python -m bench --variants tiny --full-size   # real dimensions (Tiny: 6.7 GB checkpoint, built once)

Protocol: one process; configurations loaded once, then measured in interleaved rounds with the
order rotated each round; medians reported, with an A/A control (the first configuration measured
twice) as the noise floor and CPU time beside wall time. Machine floors (fp32 GEMM GFLOP/s and
memory bandwidth) are measured first; prefill is reported against the GEMM floor and decode against
the bandwidth floor. Random weights: speeds and bytes are meaningful, answers are not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from PIL import Image

from model.inspect import summarize
from model.loading import LoadedModel, load_model
from model.processing import Message
from model.testing import make_checkpoint

CACHE = Path(tempfile.gettempdir()) / "vl2-bench-checkpoints"


def machine_floors() -> dict[str, float]:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    gflops = 5 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9
    source = torch.empty(64 * 2**20, dtype=torch.float32)  # 256 MiB
    target = torch.empty_like(source)
    target.copy_(source)
    start = time.perf_counter()
    for _ in range(5):
        target.copy_(source)
    bandwidth = 5 * 2 * source.numel() * 4 / (time.perf_counter() - start) / 1e9  # read + write
    return {"fp32_gemm_gflops": round(gflops, 1), "memory_gb_per_s": round(bandwidth, 1)}


@dataclass
class Config:
    name: str
    loaded: LoadedModel
    load_seconds: float
    rss_after_load: int
    samples: dict[str, list[float]] = field(default_factory=dict)

    def record(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)


def build(variant: str, full_size: bool) -> Path:
    path = CACHE / f"{variant}{'-full' if full_size else ''}"
    if not (path / "model.safetensors.index.json").exists():
        make_checkpoint(path, variant, full_size=full_size)
    return path


def load(name: str, path: Path, precision: str) -> Config:
    dtype, quantization = {"fp32": ("fp32", None), "bf16": ("bf16", None), "nf4": ("bf16", "4bit")}[precision]
    start = time.perf_counter()
    loaded = load_model(path, device="cpu", dtype=dtype, quantization=quantization)
    with torch.inference_mode():  # the first forward belongs to the load (lazy weights, kernels)
        loaded.model(input_ids=torch.tensor([[loaded.processor.special.bos]]))
    return Config(name, loaded, time.perf_counter() - start, psutil.Process().memory_info().rss)


def measure(config: Config, image: Image.Image, decode_tokens: int) -> None:
    model, processor = config.loaded.model, config.loaded.processor
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        start = time.perf_counter()
        inputs = processor([Message("user", "<|ref|>the object<|/ref|>.", [image])])
        config.record("preprocess_s", time.perf_counter() - start)
        tiles = inputs["pixel_values"][0, : 1 + int(inputs["images_spatial_crop"][0, 0].prod())]
        start = time.perf_counter()
        model.encode_tiles(tiles)
        vision = time.perf_counter() - start
        config.record("vision_s", vision)
        config.record("vision_per_tile_s", vision / tiles.shape[0])
        start = time.perf_counter()
        embeds = model.prepare_inputs_embeds(
            inputs["input_ids"], inputs["pixel_values"], inputs["images_seq_mask"], inputs["images_spatial_crop"]
        )
        config.record("assembly_s", max(0.0, time.perf_counter() - start - vision))
        start = time.perf_counter()
        out = model.language(inputs_embeds=embeds, attention_mask=inputs["attention_mask"].long(), use_cache=True)
        config.record("prefill_s", time.perf_counter() - start)
        config.record("prompt_tokens", embeds.shape[1])
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        steps = []
        for _ in range(decode_tokens):  # a fixed length: random weights would stop at arbitrary eos
            start = time.perf_counter()
            out = model.language(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - start)
        config.record("decode_ms_per_token", 1e3 * statistics.median(steps[2:] or steps))
    config.record("cpu_over_wall", (time.process_time() - cpu) / (time.perf_counter() - wall))


def active_params(model: torch.nn.Module) -> tuple[float, float]:
    """(parameters a prompt token multiplies, bytes a decode step reads): shared parts + top-k experts."""
    text = model.config.text_config
    share = text.num_experts_per_tok / text.n_routed_experts
    flops_params, step_bytes = 0.0, 0.0
    for name, p in model.language.named_parameters():
        weight = share if ".mlp.experts." in name else 1.0
        if "embed_tokens" in name:
            continue
        flops_params += p.numel() * weight * (2 if p.dtype == torch.uint8 else 1)  # nf4 packs 2 values a byte
        step_bytes += p.numel() * p.element_size() * weight
    return flops_params, step_bytes


def logit_error(logits: dict[str, torch.Tensor], name: str) -> float | None:
    """Relative L2 error of a configuration's logits against the same variant in fp32 (if measured)."""
    variant = name.split("/")[0]
    reference = logits.get(f"{variant}/fp32")
    own = logits.get(name.removesuffix(" (A/A)"))
    if reference is None or own is None:
        return None
    return round(((own - reference).norm() / reference.norm()).item(), 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small checkpoints, 2 rounds, 8 decode tokens")
    parser.add_argument("--variants", nargs="+", default=["tiny"], choices=["tiny", "small", "base"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "nf4"], choices=["fp32", "bf16", "nf4"])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--decode-tokens", type=int, default=None)
    parser.add_argument("--out", default="bench/results/bench.json")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    decode_tokens = args.decode_tokens or (8 if args.quick else 34)
    torch.manual_seed(0)
    floors = machine_floors()
    print(json.dumps({"floors": floors}))
    configs = [
        load(f"{variant}/{precision}", build(variant, args.full_size), precision)
        for variant in args.variants
        for precision in args.precisions
    ]
    control = Config(f"{configs[0].name} (A/A)", configs[0].loaded, configs[0].load_seconds, configs[0].rss_after_load)
    schedule = [*configs, control]
    image = Image.new("RGB", (1024, 768), (120, 140, 160))
    for round_index in range(rounds):
        shift = round_index % len(schedule)
        for config in schedule[shift:] + schedule[:shift]:
            measure(config, image, decode_tokens)
    # Quantization error on the same random weights: last-token logits vs the variant's fp32 run.
    probe = [Message("user", "Describe the picture.", [image.resize((384, 384))])]
    logits = {}
    with torch.inference_mode():
        for config in configs:
            inputs = config.loaded.processor(probe)
            logits[config.name] = config.loaded.model(**inputs).logits[0, -1].float()
    rows = []
    for config in schedule:
        median = {key: statistics.median(values) for key, values in config.samples.items()}
        flops_params, step_bytes = active_params(config.loaded.model)
        prefill_floor = 2 * flops_params * median["prompt_tokens"] / (floors["fp32_gemm_gflops"] * 1e9)
        decode_floor_ms = 1e3 * step_bytes / (floors["memory_gb_per_s"] * 1e9)
        summary = summarize(config.loaded.model)
        rows.append(
            {
                "config": config.name,
                "weights_gb": round(summary["total_bytes"] / 1e9, 3),
                "bytes_by_dtype": summary["by_dtype"],
                "routed_expert_dtypes": sorted(summary["by_kind"].get("routed experts", {}).get("dtypes", {})),
                "load_s": round(config.load_seconds, 2),
                "rss_after_load_gb": round(config.rss_after_load / 1e9, 2),
                **{key: round(value, 4) for key, value in median.items()},
                "prefill_vs_gemm_floor": round(median["prefill_s"] / prefill_floor, 2),
                "decode_vs_bandwidth_floor": round(median["decode_ms_per_token"] / decode_floor_ms, 2),
                "logit_error_vs_fp32": logit_error(logits, config.name),
            }
        )
    header = ["config", "weights_gb", "load_s", "vision_per_tile_s", "prefill_s", "prefill_vs_gemm_floor",
              "decode_ms_per_token", "decode_vs_bandwidth_floor", "logit_error_vs_fp32", "cpu_over_wall"]  # fmt: skip
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"floors": floors, "rounds": rounds, "rows": rows}, indent=2))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
