"""Server-side cost of parsing and drawing 20 labelled boxes on a 12-megapixel photo.

    python -m bench.render [--rounds 7]

Reports the median of parsing (model text → boxes) and of drawing at full resolution (the PNG
export's image), and of the browser view (drawn on the ≤2048 px display copy).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from PIL import Image

from app.render import ColorBook, draw_boxes, for_display
from model.grounding import parse_grounding


def reply_with_boxes(count: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts = []
    for index in range(count):
        x1, y1 = rng.randint(0, 800), rng.randint(0, 800)
        parts.append(f"<|ref|>object {index % 7}<|/ref|><|det|>[[{x1}, {y1}, {x1 + 150}, {y1 + 150}]]<|/det|>")
    return " and ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--boxes", type=int, default=20)
    args = parser.parse_args(argv)
    photo = Image.new("RGB", (4000, 3000), (90, 120, 150))
    text = reply_with_boxes(args.boxes)
    timings: dict[str, list[float]] = {"parse_ms": [], "draw_full_ms": [], "draw_view_ms": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        boxes = parse_grounding(text, *photo.size).boxes
        timings["parse_ms"].append(time.perf_counter() - start)
        colors = ColorBook()
        start = time.perf_counter()
        draw_boxes(photo, [(b.xyxy, b.label) for b in boxes], colors)
        timings["draw_full_ms"].append(time.perf_counter() - start)
        shown = for_display(photo)  # made once per image at ingest in the app (SessionImage.display)
        scale = shown.width / photo.width
        start = time.perf_counter()
        draw_boxes(shown, [(tuple(v * scale for v in b.xyxy), b.label) for b in boxes], colors)
        timings["draw_view_ms"].append(time.perf_counter() - start)
    print(json.dumps({k: round(statistics.median(v) * 1e3, 1) for k, v in timings.items()} | {"boxes": len(boxes)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
