"""Labelling throughput: images per second, batched against one query at a time, paired in one run.

    python -m bench.label [--full-size] [--device cpu|cuda] [--precision bf16|nf4] [--images 16]
                          [--batch-size 8] [--tokens 24]

Every side runs the same job (``app.label.job.run_job``: every image × phrase as a Find, dataset
copies, annotated copies, journal) on the same images with empty caches: with the backend's
batched ``complete_many`` (``--batch-size`` queries a batch, each image's prompt start computed
once); through a backend that answers the same queries one at a time through the app's streaming
path (which reuses the image's features and the prompt's start for the second phrase); and,
with ``--without-reuse``, one at a time with nothing reused (a plain loop over the queries). Random
weights never say "end", so every reply is exactly ``--tokens`` long on both sides (a Find answer
with one box is about 20 tokens). Prints images/s for each, the speed-up, and whether the replies
were identical. Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from app.backends.local import LocalBackend
from app.label.job import LabelJob, run_job
from app.label.journal import Journal
from app.label.sources import folder_source
from model.generation import GenerationSettings
from model.loading import load_model

from .__main__ import PRECISIONS, build

PHRASES = ("person", "forklift carrying a pallet")


class OneAtATime(LocalBackend):
    """The same model answering a batch's queries one by one, as the app's Find does."""

    def complete_many(self, conversations, settings, *, cancel_event=None):
        return ["".join(self.stream(c, settings, cancel_event=cancel_event)) for c in conversations]


def photos(folder: Path, count: int, size: tuple[int, int]) -> Path:
    """``count`` distinct noisy pictures (a smooth field would compress the question)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for index in range(count):
        noise = (torch.rand(size[1] // 8, size[0] // 8, 3, generator=generator) * 255).to(torch.uint8).numpy()
        Image.fromarray(noise).resize(size).save(folder / f"photo{index:03d}.png")
    return folder


def timed_job(backend: LocalBackend, images: Path, out: Path, batch_size: int, settings: GenerationSettings):
    model = backend.loaded.model
    for cache in (model.vision_cache, model.prefix_cache):
        if cache is not None:
            cache.clear()
    job = LabelJob(folder_source(str(images)), PHRASES, backend, out, batch_size=batch_size, settings=settings)
    start = time.perf_counter()
    summary = run_job(job)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    replies = [r.raw_text for record in Journal(out).records() for r in record.results]
    return summary.done / seconds, seconds, replies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="Tiny at its real dimensions (6.7 GB, built once)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", choices=sorted(PRECISIONS))
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="640x480", help="picture size, WxH (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per batch on the batched side")
    parser.add_argument("--tokens", type=int, default=24, help="reply length in tokens")
    parser.add_argument("--without-reuse", action="store_true", help="also time one at a time with no reuse")
    return parser


def measure(args: argparse.Namespace) -> dict:
    """Every side's images/s and seconds, the speed-ups, and how many replies matched one at a time."""
    width, height = (int(v) for v in args.size.lower().split("x"))
    dtype, quantization = PRECISIONS[args.precision]
    loaded = load_model(
        build("tiny", args.full_size, args.device), device=args.device, dtype=dtype, quantization=quantization
    )
    settings = GenerationSettings(
        max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0.0, repetition_penalty=1.0
    )
    sides: dict[str, tuple[float, float, list[str]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        images = photos(root / "images", args.images, (width, height))
        warm = photos(root / "warm", 1, (width, height))
        timed_job(LocalBackend(loaded), warm, root / "warm-out", 2, settings)  # first-call costs
        sides["batched"] = timed_job(LocalBackend(loaded), images, root / "batched", args.batch_size, settings)
        sides["one at a time"] = timed_job(OneAtATime(loaded), images, root / "single", args.batch_size, settings)
        if args.without_reuse:
            kept = loaded.model.vision_cache, loaded.model.prefix_cache
            loaded.model.vision_cache = loaded.model.prefix_cache = None
            try:
                sides["one at a time, no reuse"] = timed_job(
                    OneAtATime(loaded), images, root / "plain", args.batch_size, settings
                )
            finally:
                loaded.model.vision_cache, loaded.model.prefix_cache = kept
    on_cuda = args.device.startswith("cuda")
    batched, single = sides["batched"], sides["one at a time"]
    result = {
        "device": torch.cuda.get_device_name() if on_cuda else f"CPU ({torch.get_num_threads()} threads)",
        "config": f"Tiny{' full-size' if args.full_size else ' (test size)'} {args.precision}",
        "workload": f"{args.images} images {width}x{height} x {len(PHRASES)} phrases, {args.tokens} tokens a reply",
        "batch_size": args.batch_size,
        "images_per_s": {name: round(side[0], 4) for name, side in sides.items()},
        "seconds": {name: round(side[1], 1) for name, side in sides.items()},
        "speedup": round(batched[0] / single[0], 2),
        "identical": f"{sum(a == b for a, b in zip(batched[2], single[2], strict=True))} of {len(single[2])}",
    }
    if "one at a time, no reuse" in sides:
        result["speedup_over_no_reuse"] = round(batched[0] / sides["one at a time, no reuse"][0], 2)
    return result


def main() -> None:
    result = measure(build_parser().parse_args())
    print(f"{result['config']} on {result['device']}: {result['workload']}")
    for name, rate in result["images_per_s"].items():
        label = f"batched, {result['batch_size']} queries" if name == "batched" else name
        print(f"{label:<28}{rate:8.3f} images/s  ({result['seconds'][name]:.1f} s)")
    over = result.get("speedup_over_no_reuse")
    print(f"speed-up: {result['speedup']:.2f}x" + (f" ({over:.2f}x over no reuse)" if over else ""))
    print(f"replies identical to one at a time: {result['identical']}")


if __name__ == "__main__":
    main()
