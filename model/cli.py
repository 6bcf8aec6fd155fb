"""``python -m model {ground,chat,parse,plan}`` — the runtime from the shell.

* ``ground --model M --image IMG "the red car"`` → JSON ``{"boxes": [...], "text": raw}``
* ``chat --model M --image IMG "question"`` → the answer, streamed to stdout
* ``parse --size WxH`` → boxes from model text on stdin (no model loaded)
* ``plan --size WxH [--images N]`` → tile grid and image-token count (no model loaded)
* ``inspect --model M [--quantization 4bit] [--json]`` → bytes by dtype and part, and placement
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 640x480, got {text!r}") from exc
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError("width and height must be positive")
    return width, height


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="deepseek-ai/deepseek-vl2-tiny", help="hub id or local checkpoint folder")
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--quantization", default=None, choices=["4bit", "8bit", "none"])
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"])
    parser.add_argument(
        "--gpu-memory",
        default=None,
        help="GPU budget like 8GiB, or auto (the card's free memory); experts that do not fit run on the CPU",
    )
    parser.add_argument("--max-new-tokens", type=int, default=512)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m model", description="DeepSeek-VL2 runtime on transformers 5")
    sub = parser.add_subparsers(dest="command", required=True)
    ground = sub.add_parser("ground", help="boxes for a phrase, as JSON")
    _add_model_args(ground)
    ground.add_argument("phrase")
    chat = sub.add_parser("chat", help="ask about images; the answer streams")
    _add_model_args(chat)
    chat.add_argument("question")
    chat.add_argument("--temperature", type=float, default=0.1)
    parse = sub.add_parser("parse", help="parse model text from stdin into boxes")
    parse.add_argument("--size", type=_size, required=True, help="image size WxH, e.g. 640x480")
    inspect = sub.add_parser("inspect", help="what was loaded: bytes by dtype and part, and placement")
    _add_model_args(inspect)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    plan = sub.add_parser("plan", help="tile grid and image-token count for an image size")
    plan.add_argument("--size", type=_size, required=True)
    plan.add_argument("--images", type=int, default=1, help="images in the request (3+ turns tiling off)")
    return parser


def _load(args: argparse.Namespace):
    from .loading import load_model

    return load_model(
        args.model, device=args.device, dtype=args.dtype, quantization=args.quantization, gpu_memory=args.gpu_memory
    )


def _open_images(paths: Sequence[str]):
    from .images import open_image

    return [open_image(path) for path in paths]


def run_ground(args: argparse.Namespace) -> int:
    from .generation import GenerationSettings, generate_text
    from .grounding import parse_grounding
    from .processing import Message
    from .prompts import find_prompt

    if len(args.image) != 1:
        raise SystemExit("ground needs exactly one --image")
    images = _open_images(args.image)
    loaded = _load(args)
    # Plain greedy decoding, as the official README grounds (a repetition penalty would fight the
    # phrase being copied from the prompt and repeated coordinates).
    settings = GenerationSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=args.max_new_tokens)
    text = generate_text(loaded.model, loaded.processor, [Message("user", find_prompt(args.phrase), images)], settings)
    result = parse_grounding(text, images[0].width, images[0].height)
    document = result.to_dict()
    print(json.dumps({"boxes": document["boxes"], "rejected": document["rejected"], "text": text}, ensure_ascii=False))
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from .generation import GenerationSettings, stream_reply
    from .processing import Message

    images = _open_images(args.image)
    loaded = _load(args)
    settings = GenerationSettings(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    stream = stream_reply(loaded.model, loaded.processor, [Message("user", args.question, images)], settings)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.cancel()
        stream.join()
    sys.stdout.write("\n")
    return 0


def run_parse(args: argparse.Namespace) -> int:
    from .grounding import parse_grounding

    width, height = args.size
    print(json.dumps(parse_grounding(sys.stdin.read(), width, height).to_dict(), ensure_ascii=False))
    return 0


def run_plan(args: argparse.Namespace) -> int:
    from .image_processing import plan_tiles

    width, height = args.size
    if args.images < 1:
        raise SystemExit("--images must be at least 1")
    plan = plan_tiles(width, height, num_images=args.images)
    print(json.dumps({"grid": list(plan.grid), "tiles": plan.tiles, "image_tokens": plan.image_tokens}))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from .inspect import format_table
    from .loading import UNQUANTIZED_MODULES, gpu_budget_bytes
    from .placement import plan_for_model

    # Without a CUDA device the budget is planned, not applied: load on the CPU, show what would go where.
    plan_only = args.gpu_memory is not None and not torch.cuda.is_available()
    budget = args.gpu_memory
    if plan_only:
        args.device, args.gpu_memory = "cpu", None
    loaded = _load(args)
    summary = loaded.info.weights
    placement = loaded.info.placement
    if plan_only:
        plan = plan_for_model(loaded.model, gpu_budget_bytes(budget, "cpu"), unquantized=tuple(UNQUANTIZED_MODULES))
        placement = f"plan only (no CUDA device here): {plan.describe()}"
    if args.json:
        print(json.dumps({"model": args.model, "quantization": loaded.info.quantization, "placement": placement,
                          **summary}))  # fmt: skip
    else:
        print(f"{loaded.info.summary()}\n{format_table(summary)}")
        for line in (placement, loaded.info.compute):
            if line:
                print(line)
    return 0


COMMANDS = {"ground": run_ground, "chat": run_chat, "parse": run_parse, "plan": run_plan, "inspect": run_inspect}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .loading import ModelLoadError

    try:
        return COMMANDS[args.command](args)
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
