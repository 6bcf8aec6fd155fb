"""What reusing work across questions saves: time to first token of a follow-up, paired with the first.

    python -m bench.reuse [--full-size] [--rounds 2] [--dtype bf16]

Each round starts with empty caches and asks, about one 1024×768 photo:
1. the first question (vision and the whole prompt computed);
2. a follow-up in the same conversation (the image's features and the first turn's keys and values
   reused: only the new turn is prefilled);
3. the same follow-up with reuse switched off (what every follow-up cost before);
4. a Find on the same photo in a new conversation (as click-to-ground's whole-image call: the
   vision features and the shared start of the prompt are reused).
Time to first token is the time to generate one token. It prints medians, the follow-up's share of
the first question's time, the vision cache's hit rate and the memory both caches hold. Numbers
are printed, never asserted. Random weights: the times are meaningful, the answers are not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from model.generation import GenerationSettings, generate_text
from model.loading import load_model
from model.processing import Message

from .__main__ import build

ONE_TOKEN = GenerationSettings(temperature=0, max_new_tokens=1, min_new_tokens=1)


def photo() -> Image.Image:
    """A 1024×768 picture with structure in it (a smooth field would compress the question)."""
    torch.manual_seed(0)
    noise = (torch.rand(768, 1024, 3) * 255).to(torch.uint8).numpy()
    return Image.fromarray(noise).resize((1024, 768))


def timed(model, processor, conversation: list[Message]) -> tuple[float, str]:
    """Seconds to the first token of ``conversation``'s reply, and that token."""
    start = time.perf_counter()
    out = generate_text(model, processor, conversation, ONE_TOKEN)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full-size", action="store_true", help="Tiny at its real dimensions (6.7 GB, built once)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="bf16")
    args = parser.parse_args()
    path = build("tiny", args.full_size)
    loaded = load_model(path, device="cpu", dtype=args.dtype)
    model, processor = loaded.model, loaded.processor
    vision, prefixes = model.vision_cache, model.prefix_cache
    generate_text(model, processor, [Message("user", "Hi")], ONE_TOKEN)  # first-call costs belong to the load
    image = photo()
    first = [Message("user", "Describe this photo in detail.", [image])]
    times: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        vision.clear()
        prefixes.clear()
        seconds, reply = timed(model, processor, first)
        times.setdefault("first question", []).append(seconds)
        follow_up = [*first, Message("assistant", reply or "A photo."), Message("user", "What colour dominates?")]
        seconds, _ = timed(model, processor, follow_up)
        times.setdefault("follow-up, reused", []).append(seconds)
        model.vision_cache = model.prefix_cache = None
        try:
            seconds, _ = timed(model, processor, follow_up)
        finally:
            model.vision_cache, model.prefix_cache = vision, prefixes
        times.setdefault("follow-up, nothing reused", []).append(seconds)
        find = [Message("user", "<|ref|>the brightest patch<|/ref|>.", [image])]
        seconds, _ = timed(model, processor, find)
        times.setdefault("Find on the same photo (new conversation)", []).append(seconds)
    tokens = len(processor.encode_conversation(follow_up)[0])
    print(f"\nTime to first token, {'full-size' if args.full_size else 'small generated'} Tiny, {args.dtype}, CPU, "
          f"{args.rounds} rounds; follow-up prompt {tokens:,} tokens")  # fmt: skip
    print(f"{'request':44} {'median s':>9}")
    for name, values in times.items():
        print(f"{name:44} {statistics.median(values):9.2f}")
    share = statistics.median(times["follow-up, reused"]) / statistics.median(times["first question"])
    print(f"follow-up / first question: {share:.1%}")
    print(vision.stats().summary())
    print(prefixes.stats().summary())


if __name__ == "__main__":
    main()
