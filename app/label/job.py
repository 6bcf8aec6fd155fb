"""A labelling run: every input × every phrase as the app's Find query, in batches, journalled.

The loop takes the inputs in order, skipping what the journal already holds; loads a batch of
images (an unreadable one becomes a "skipped" record with its reason); asks the backend for all
of the batch's queries at once (``Backend.complete_many``: one left-padded batch in this process,
or that many requests in flight to a serving engine); reads the boxes; writes each image's dataset
copy and annotated copy, then its journal line. Stopping (Stop, Ctrl-C, an engine that went away)
loses at most the batch in flight; the exports are written from the journal either way.
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from model.generation import GenerationSettings
from model.grounding import parse_grounding
from model.processing import Message

from ..backends.base import Backend
from ..exports import write_json
from ..modes import Mode, build_prompt
from ..render import ColorBook, draw_boxes
from . import formats, video
from .formats import FORMATS
from .journal import Journal
from .records import ImageRecord, JobSummary, LabelBox, PhraseResult
from .sources import Item, Source

# The app's Find, greedy: a dataset should not change from one run to the next.
LABEL_SETTINGS = GenerationSettings(max_new_tokens=512, temperature=0.0, repetition_penalty=1.0)
IMAGES_DIR, ANNOTATED_DIR = "images", "annotated"
VIDEO_NAME, FRAMES_NAME = "annotated.mp4", "frames.json"
# Formats a dataset copy is kept in as it was sent; anything else (or a rotated photo) is saved as PNG.
KEPT_FORMATS = {"JPEG": {".jpg", ".jpeg"}, "PNG": {".png"}}


@dataclass(frozen=True)
class Progress:
    done: int  # inputs finished, skipped ones and earlier runs' included
    total: int
    skipped: int
    images_per_second: float  # this run's pace
    eta_s: float | None
    batch: tuple[ImageRecord, ...] = ()  # the records just finished (none at the start)


@dataclass
class LabelJob:
    source: Source
    phrases: tuple[str, ...]
    backend: Backend
    out_dir: Path
    formats: tuple[str, ...] = ("coco",)
    batch_size: int | None = None  # queries per batch; None: as many as the backend says fit
    settings: GenerationSettings = field(default_factory=lambda: LABEL_SETTINGS)
    annotate: bool = True
    colors: ColorBook = field(default_factory=ColorBook)

    def __post_init__(self) -> None:
        self.phrases = tuple(dict.fromkeys(plain_phrase(p) for p in self.phrases if p.strip()))
        if not self.phrases:
            raise ValueError("give at least one phrase to find, e.g. --find person")
        unknown = sorted(set(self.formats) - set(FORMATS))
        if unknown:
            raise ValueError(f"unknown format {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        for phrase in self.phrases:
            self.colors.color(phrase)  # the phrases' order fixes their colours


def plain_phrase(phrase: str) -> str:
    """A phrase to find, stripped; the model's own tags are refused (the app writes the Find prompt)."""
    phrase = phrase.strip()
    if "<|" in phrase or "<｜" in phrase:
        raise ValueError(f"“{phrase[:40]}” holds the model's tags; write the phrase in plain words, e.g. “red car”")
    return phrase


def queries(image: Image.Image, phrases: Sequence[str]) -> list[list[Message]]:
    """One Find conversation per phrase, exactly as the app's Find mode sends it."""
    return [[Message("user", build_prompt(Mode.FIND, phrase), [image])] for phrase in phrases]


def phrase_result(phrase: str, raw_text: str, width: int, height: int) -> PhraseResult:
    boxes = tuple(LabelBox(phrase, box.xyxy, box.norm999) for box in parse_grounding(raw_text, width, height).boxes)
    return PhraseResult(phrase, raw_text, boxes)


def _batches(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _dataset_copy(item: Item, image: Image.Image, folder: Path) -> str:
    """The image under ``images/`` as the model saw it: the file itself when that is what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = Path(item.name).suffix.lower()
    if item.path is not None:
        with Image.open(item.path) as stored:
            same = stored.size == image.size and suffix in KEPT_FORMATS.get(stored.format or "", ())
            upright = stored.getexif().get(0x0112, 1) == 1  # no EXIF rotation to bake in
        if same and upright:
            shutil.copyfile(item.path, folder / item.name)
            return item.name
    name = Path(item.name).stem + ".png"
    image.save(folder / name, format="PNG", compress_level=1)
    return name


def annotated_path(out_dir: Path, record: ImageRecord) -> Path:
    """Where a record's annotated copy is written (and the page's preview reads it)."""
    return out_dir / ANNOTATED_DIR / (Path(record.name).stem + ".jpg")


def _draw(job: LabelJob, image: Image.Image, boxes: Sequence[LabelBox]) -> Image.Image:
    """The server's renderer, on ``image`` itself (the job never needs it unmarked again)."""
    return draw_boxes(image, [(box.xyxy, box.label) for box in boxes], job.colors, in_place=True)


def _annotated_copy(job: LabelJob, record: ImageRecord, image: Image.Image) -> None:
    path = annotated_path(job.out_dir, record)
    path.parent.mkdir(parents=True, exist_ok=True)
    _draw(job, image, record.boxes).save(path, format="JPEG", quality=90)


def label_batch(
    backend: Backend,
    batch: Sequence[Item],
    phrases: Sequence[str],
    settings: GenerationSettings,
    cancel: threading.Event,
) -> list[tuple[ImageRecord, Image.Image | None]] | None:
    """Each item's record (and its image, if it could be read), or None when stopped mid-batch.

    Every item × phrase is one Find query, and the whole batch goes to the backend at once.
    """
    loaded: dict[str, Image.Image] = {}
    failed: dict[str, str] = {}
    for item in batch:
        try:
            loaded[item.key] = item.load()
        except Exception as exc:  # any unreadable input is recorded, never fatal
            failed[item.key] = str(exc) or type(exc).__name__
    conversations = [q for image in loaded.values() for q in queries(image, phrases)]
    replies = iter(backend.complete_many(conversations, settings, cancel_event=cancel) if conversations else [])
    if cancel.is_set():
        return None
    out: list[tuple[ImageRecord, Image.Image | None]] = []
    for item in batch:
        image = loaded.get(item.key)
        if image is None:
            out.append((ImageRecord(item.key, item.name, "skipped", reason=failed[item.key]), None))
            continue
        width, height = image.size
        results = tuple(phrase_result(p, next(replies), width, height) for p in phrases)
        record = ImageRecord(item.key, item.name, "done", width, height, results, frame=item.frame, time_s=item.time_s)
        out.append((record, image))
    return out


def label_all(
    backend: Backend,
    items: Sequence[Item],
    phrases: Sequence[str],
    settings: GenerationSettings,
    *,
    batch_size: int | None = None,
    cancel: threading.Event | None = None,
) -> list[ImageRecord] | None:
    """Records for a few items held in memory (the API's /label), batched like a job; None if stopped."""
    cancel = cancel or threading.Event()
    per_batch = images_per_batch(backend, phrases, settings, batch_size)
    records: list[ImageRecord] = []
    for start in range(0, len(items), per_batch):
        labelled = label_batch(backend, items[start : start + per_batch], phrases, settings, cancel)
        if labelled is None:
            return None
        records += [record for record, _ in labelled]
    return records


def _keep(job: LabelJob, item: Item, record: ImageRecord, image: Image.Image | None) -> ImageRecord:
    """Write a finished image's dataset copy and annotated copy; the record names the copy."""
    if image is None:
        return record
    record = replace(record, name=_dataset_copy(item, image, job.out_dir / IMAGES_DIR))
    if job.annotate:
        _annotated_copy(job, record, image)
    return record


def job_identity(job: LabelJob) -> dict:
    """What must match for a rerun to resume this folder's job."""
    return {
        "source": job.source.identity or job.source.description,
        "phrases": list(job.phrases),
        "model": job.backend.info.model_id,
        "max_new_tokens": job.settings.max_new_tokens,
    }


def run_job(
    job: LabelJob,
    *,
    cancel: threading.Event | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> JobSummary:
    """Label what the journal does not hold yet; write the exports. Ctrl-C and ``cancel`` stop cleanly."""
    cancel = cancel or threading.Event()
    journal = Journal(job.out_dir)
    journal.claim(job_identity(job))
    earlier = journal.records()
    summary = JobSummary(total=job.source.total, resumed=len(earlier))
    summary.done = sum(r.status == "done" for r in earlier)
    summary.skipped = len(earlier) - summary.done
    items = job.source.items(frozenset(r.key for r in earlier))
    started = time.perf_counter()
    labelled_now = 0
    if progress is not None:
        progress(Progress(len(earlier), summary.total, summary.skipped, 0.0, None))
    try:
        for batch in _batches(items, images_per_batch(job.backend, job.phrases, job.settings, job.batch_size)):
            labelled = label_batch(job.backend, batch, job.phrases, job.settings, cancel)
            if labelled is None:
                summary.stopped = True
                break
            # Files first, then the journal line: a journalled image always has its copies.
            records = [_keep(job, item, record, image) for item, (record, image) in zip(batch, labelled, strict=True)]
            journal.append(records)
            labelled_now += len(records)
            summary.done += sum(r.status == "done" for r in records)
            summary.skipped += sum(r.status == "skipped" for r in records)
            if progress is not None:
                elapsed = time.perf_counter() - started
                pace = labelled_now / elapsed if elapsed > 0 else 0.0
                left = summary.total - summary.done - summary.skipped
                progress(
                    Progress(
                        summary.done + summary.skipped,
                        summary.total,
                        summary.skipped,
                        pace,
                        left / pace if pace > 0 else None,
                        tuple(records),
                    )
                )
            if cancel.is_set():
                summary.stopped = True
                break
    except KeyboardInterrupt:
        cancel.set()  # the batch on the compute thread ends within one decoding step
        summary.stopped = True
    finally:
        summary.seconds = time.perf_counter() - started
        records = journal.records()
        summary.exports = write_outputs(job, records, complete=not summary.stopped)
    summary.boxes = sum(len(r.boxes) for r in records)
    summary.skipped_inputs = [(r.key, r.reason) for r in records if r.status == "skipped"]
    return summary


def images_per_batch(
    backend: Backend, phrases: Sequence[str], settings: GenerationSettings, queries_per_batch: int | None = None
) -> int:
    """Images per batch: the user's (or else the backend's) query count spread over the phrases."""
    if queries_per_batch is None:
        probe = Image.new("RGB", (1024, 768))  # a typical photo's tiling stands in for the real ones
        queries_per_batch = backend.batch_size(queries(probe, phrases[:1])[0], settings)
    return max(1, math.ceil(queries_per_batch / len(phrases)))


def write_outputs(job: LabelJob, records: list[ImageRecord], *, complete: bool) -> dict[str, str]:
    """The chosen exports from every journalled record; a video's annotated copy once all frames are in."""
    written = formats.write_exports(
        records, job.phrases, job.out_dir, job.formats, image_names={r.key: r.name for r in records}
    )
    outputs = {name: str(path) for name, path in written.items()}
    source = job.source
    if source.video_path is not None and source.video_info is not None and complete:
        samples = video.samples_from_records(records)
        video.write_annotated_video(
            source.video_path, job.out_dir / VIDEO_NAME, samples, draw=lambda image, boxes: _draw(job, image, boxes)
        )
        frames_path = job.out_dir / FRAMES_NAME
        write_json(video.frame_json(samples, source.video_info), frames_path)
        outputs.update(video=str(job.out_dir / VIDEO_NAME), frames=str(frames_path))
    return outputs
