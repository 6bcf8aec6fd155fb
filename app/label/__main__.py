"""``python -m app.label``: label a folder, a glob, a zip or a video's frames as a dataset.

    python -m app.label --images photos/ --find person --find "forklift carrying a pallet" --out labels/
    python -m app.label --video yard.mp4 --every 2 --find forklift --out yard/ --format yolo

Run the same command again to resume an interrupted job: the journal in --out says what is done.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from ..launch import add_model_arguments, make_backend
from .formats import FORMATS
from .job import LABEL_SETTINGS, LabelJob, Progress, run_job
from .journal import JobMismatch
from .sources import open_source

SKIPPED_SHOWN = 10


def _batch_size(value: str) -> int | None:
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError("a whole number of queries per batch, at least 1, or 'auto'")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.label",
        description="Ground phrases on many images (or a video's frames) and write a dataset: "
        "COCO, YOLO, Label Studio or JSONL, with annotated copies.",
    )
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", metavar="DIR_OR_GLOB", help="a folder (searched recursively), a glob or a .zip")
    inputs.add_argument("--video", metavar="FILE", help="a video file; frames are sampled with --every")
    parser.add_argument(
        "--every", type=float, default=1.0, metavar="SECONDS", help="video: one frame every SECONDS (default 1)"
    )
    parser.add_argument(
        "--find", action="append", required=True, metavar="PHRASE", help="what to box; repeat for more phrases"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="the dataset folder (resumes a job already there)")
    parser.add_argument(
        "--format",
        action="append",
        choices=FORMATS,
        metavar="FORMAT",
        help=f"one of {', '.join(FORMATS)}; repeat for several (default coco)",
    )
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        metavar="N|auto",
        help="queries per batch (default auto: what fits in memory, or 8 in flight to a server)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=LABEL_SETTINGS.max_new_tokens,
        help="reply cap per query (default %(default)s; a crowded image needs ~20 per box)",
    )
    parser.add_argument("--no-annotated", action="store_true", help="skip the annotated copies of the images")
    add_model_arguments(parser)
    return parser


def _interrupt(*_: object) -> None:
    """A stop request (SIGTERM, as from a process manager) stops the job as Ctrl-C does."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.every <= 0:
        print("--every must be more than 0 seconds", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return label(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def label(args: argparse.Namespace) -> int:
    try:
        source = open_source(args.images, args.video, args.every)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backend = make_backend(args, background=False)
    try:
        job = LabelJob(
            source=source,
            phrases=tuple(args.find),
            backend=backend,
            out_dir=Path(args.out),
            formats=tuple(dict.fromkeys(args.format or ["coco"])),
            batch_size=args.batch_size,
            settings=LABEL_SETTINGS.with_max(args.max_new_tokens),
            annotate=not args.no_annotated,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Labelling {source.description} with {len(job.phrases)} phrase(s) into {job.out_dir}", file=sys.stderr)
    bar = tqdm(total=source.total, unit="img", desc="labelled", dynamic_ncols=True)

    def show(progress: Progress) -> None:
        if not progress.batch:  # the start: a resumed job's bar begins where the journal is
            bar.initial = bar.n = bar.last_print_n = progress.done
        else:
            bar.update(progress.done - bar.n)
        bar.set_postfix(skipped=progress.skipped, refresh=True)

    try:
        summary = run_job(job, cancel=threading.Event(), progress=show)
    except JobMismatch as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an engine that went away, out of memory: what is done is kept
        bar.close()
        print(f"error: {exc}\nWhat was finished is in {job.out_dir}; run the same command to resume.", file=sys.stderr)
        return 1
    bar.close()
    labelled = summary.done + summary.skipped - summary.resumed
    rate = labelled / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.done} labelled, {summary.skipped} skipped, {summary.boxes} boxes "
        f"({labelled} this run in {summary.seconds:.1f} s, {rate:.2f} images/s)",
        file=sys.stderr,
    )
    for key, reason in summary.skipped_inputs[:SKIPPED_SHOWN]:
        print(f"  skipped {key}: {reason}", file=sys.stderr)
    if len(summary.skipped_inputs) > SKIPPED_SHOWN:
        print(f"  … and {len(summary.skipped_inputs) - SKIPPED_SHOWN} more (journal.jsonl)", file=sys.stderr)
    for name, path in summary.exports.items():
        print(f"  {name}: {path}", file=sys.stderr)
    if summary.stopped:
        print("Stopped. Run the same command again to resume where it stopped.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
