"""The page's Label tab: many images, a zip or a video in; phrases; a dataset zip out.

The handlers live in :class:`LabelTab` and are tested without a browser; :func:`build_label_tab`
only lays out the components and wires them. A run is the command's job (``app/label/job.py``)
in a thread, writing into the conversation's private folder; the page shows its progress after
each batch, a grid of annotated images, and finally a zip of the chosen format. Stop ends the
batch in flight within one decoding step, and the zip then holds what was finished.
"""

from __future__ import annotations

import html
import itertools
import queue
import re
import threading
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import gradio as gr

from ..controller import Controller
from ..errors import UserError
from ..session import Session
from ..zerogpu import gpu, on_zerogpu
from .job import LABEL_SETTINGS, LabelJob, Progress, annotated_path, plain_phrase, run_job
from .journal import JOB_NAME
from .records import JobSummary
from .sources import VIDEO_SUFFIXES, Source, uploads_source, video_source

FORMAT_CHOICES = [("COCO", "coco"), ("YOLO", "yolo"), ("Label Studio", "labelstudio"), ("JSONL", "jsonl")]
PREVIEW_IMAGES = 48
_PHRASE_SPLIT = re.compile(r"[\n,;]+")
# Already compressed: stored as they are in the zip, not deflated again.
_STORED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".mp4", ".gif"}


def parse_phrases(text: str, *, max_phrases: int, max_chars: int) -> tuple[str, ...]:
    """One phrase per line (or comma-separated), duplicates once, in the order typed."""
    phrases = tuple(dict.fromkeys(p.strip() for p in _PHRASE_SPLIT.split(text or "") if p.strip()))
    if not phrases:
        raise UserError("Say what to find, e.g. “person, forklift carrying a pallet”.")
    if len(phrases) > max_phrases:
        raise UserError(f"{len(phrases)} phrases; the limit is {max_phrases}. Label in several runs.")
    long = next((p for p in phrases if len(p) > max_chars), None)
    if long is not None:
        raise UserError(f"“{long[:40]}…” is {len(long)} characters; the limit is {max_chars}.")
    try:
        return tuple(plain_phrase(p) for p in phrases)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


def progress_text(progress: Progress) -> str:
    share = progress.done / progress.total if progress.total else 1.0
    filled = round(share * 20)
    line = f"`{'█' * filled}{'░' * (20 - filled)}` **{progress.done} / {progress.total}** images"
    if progress.images_per_second > 0:
        line += f" · {progress.images_per_second:.2f} images/s"
    if progress.eta_s is not None and progress.done < progress.total:
        line += f" · about {progress.eta_s:.0f} s left"
    if progress.skipped:
        line += f" · {progress.skipped} skipped"
    return line


def summary_text(summary: JobSummary, source: Source) -> str:
    labelled = summary.done + summary.skipped
    head = (
        f"**Stopped** after {labelled} of {summary.total} images (the zip holds those)"
        if summary.stopped
        else f"**Done:** {summary.done} images labelled"
    )
    lines = [f"{head}, {summary.boxes} boxes, in {summary.seconds:.1f} s ({source.description})."]
    for key, reason in summary.skipped_inputs[:5]:
        lines.append(f"- skipped {html.escape(key)}: {html.escape(reason)}")
    if len(summary.skipped_inputs) > 5:
        lines.append(f"- … and {len(summary.skipped_inputs) - 5} more skipped (listed in the zip's journal)")
    return "\n".join(lines)


def zip_dataset(out_dir: Path, target: Path) -> Path:
    """Everything the run wrote but its bookkeeping, under one folder named like the zip."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_suffix(".tmp")
    with zipfile.ZipFile(staging, "w") as archive:
        for path in sorted(out_dir.rglob("*")):
            if not path.is_file() or path.name in (JOB_NAME,) or path.suffix == ".tmp":
                continue
            stored = path.suffix.lower() in _STORED_SUFFIXES
            archive.write(
                path,
                f"{target.stem}/{path.relative_to(out_dir).as_posix()}",
                compress_type=zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED,
            )
    staging.replace(target)
    return target


class LabelTab:
    """The Label tab's handlers; one run per conversation at a time."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.limits = controller.limits
        self.running: dict[str, threading.Event] = {}
        self._runs = itertools.count(1)

    def source_for(self, files: Sequence[str] | None, every: float | None) -> Source:
        paths = [self.controller.uploads.local_path(f) if self.controller.uploads else str(f) for f in files or []]
        if not paths:
            raise UserError("Drop images, a zip of images or a video first.")
        videos = [p for p in paths if Path(p).suffix.lower() in VIDEO_SUFFIXES]
        limit = self.limits.max_label_images
        if videos:
            if len(paths) > 1:
                raise UserError("Label one video at a time, without images alongside.")
            seconds = float(every or 0)
            if seconds <= 0:
                raise UserError("Set how often to take a frame: every 0.5 s, 1 s, 5 s…")
            try:
                source = video_source(Path(videos[0]), seconds)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
            if source.total > limit:
                needed = source.video_info.seconds / limit if source.video_info else seconds
                raise UserError(
                    f"One frame every {seconds:g} s gives {source.total} frames; this page labels at most {limit}. "
                    f"Take one every {needed:.1f} s or more, or use `python -m app.label --video` for all of them."
                )
            return source
        try:
            source = uploads_source(paths, self.limits.shape)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        if source.total > limit:
            raise UserError(
                f"{source.total} images; this page labels at most {limit} at once. "
                "Split them, or use `python -m app.label --images` for any number."
            )
        return source

    def run(
        self, files: Sequence[str] | None, phrases_text: str, fmt: str, every: float | None, session: Session
    ) -> Iterator[tuple[str, list[tuple[str, str]], str | None]]:
        """Yield (status, preview grid, zip path or None) after each batch and at the end."""
        phrases = parse_phrases(
            phrases_text, max_phrases=self.limits.max_label_phrases, max_chars=self.limits.max_label_chars
        )
        if fmt not in dict(FORMAT_CHOICES).values():
            raise UserError(f"Choose a format: {', '.join(name for name, _ in FORMAT_CHOICES)}.")
        source = self.source_for(files, every)
        if session.session_id in self.running:
            raise UserError("A labelling run is already going in this tab; Stop it first.")
        out_dir = self.controller.session_dir(session) / "label" / f"run-{next(self._runs)}"
        job = LabelJob(source, phrases, self.controller.backend, out_dir, formats=(fmt,), settings=LABEL_SETTINGS)
        cancel = threading.Event()
        updates: queue.SimpleQueue[Progress | JobSummary | BaseException] = queue.SimpleQueue()

        def work() -> None:
            try:
                updates.put(run_job(job, cancel=cancel, progress=updates.put))
            except BaseException as exc:  # handed to the page's thread, which shows it
                updates.put(exc)

        self.running[session.session_id] = cancel
        worker = threading.Thread(target=work, name="vl2-label", daemon=True)
        worker.start()
        preview: list[tuple[str, str]] = []
        try:
            yield f"Labelling {source.description}…", preview, None
            while True:
                update = updates.get()
                if isinstance(update, BaseException):
                    raise UserError(f"The run failed: {update}") from update
                if isinstance(update, JobSummary):
                    target = self.controller.export_dir(session) / f"dataset-{fmt}-{out_dir.name}.zip"
                    yield summary_text(update, source), preview, str(zip_dataset(out_dir, target))
                    return
                preview = (preview + _previews(out_dir, update))[:PREVIEW_IMAGES]
                if session.closed:
                    cancel.set()
                yield progress_text(update), preview, None
        finally:
            cancel.set()  # a closed page or a cancelled event: the model stops within a step
            worker.join()
            self.running.pop(session.session_id, None)

    def stop(self, session: Session | None) -> None:
        if session is not None and session.session_id in self.running:
            self.running[session.session_id].set()


def _previews(out_dir: Path, progress: Progress) -> list[tuple[str, str]]:
    """The annotated copies of the batch that just finished, captioned with their box counts."""
    shown = []
    for record in progress.batch:
        path = annotated_path(out_dir, record)
        if record.status == "done" and path.exists():
            count = len(record.boxes)
            shown.append((str(path), f"{record.name}: {count} box{'' if count == 1 else 'es'}"))
    return shown


def build_label_tab(
    controller: Controller, state: gr.State, session_of: Callable[[Session | None, gr.Request | None], Session]
) -> LabelTab:
    """The tab's components and events (call inside ``gr.Tab``)."""
    tab = LabelTab(controller)
    limits = controller.limits
    gr.Markdown(
        "Label many images at once: every phrase is found on every image (one Find each), and the boxes become a "
        f"dataset. Up to {limits.max_label_images} images or video frames here; for more, and to resume long jobs, "
        "run `python -m app.label` (see the README).",
        elem_id="label-intro",
    )
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=300):
            files = gr.File(
                label="Images, a zip of images, or a video",
                file_count="multiple",
                file_types=["image", ".zip", "video"],
                type="filepath",
                elem_id="label-files",
            )
            phrases = gr.Textbox(
                label="What to find",
                placeholder="one per line or comma-separated: person, forklift carrying a pallet",
                lines=2,
                elem_id="label-phrases",
            )
            with gr.Row():
                fmt = gr.Radio(FORMAT_CHOICES, value="coco", label="Format", elem_id="label-format")
                every = gr.Number(1.0, minimum=0.05, label="Video: a frame every (s)", elem_id="label-every")
            with gr.Row():
                run_button = gr.Button("Label", variant="primary", elem_id="label-run")
                stop_button = gr.Button("Stop", variant="secondary", elem_id="label-stop")
            status = gr.Markdown(elem_id="label-status")
            download = gr.File(label="Dataset", interactive=False, elem_id="label-download")
        with gr.Column(scale=2, min_width=300):
            grid = gr.Gallery(label="Preview", columns=4, height=520, elem_id="label-grid", object_fit="contain")

    def start(files, phrases_text, fmt, every, session, request: gr.Request):
        session = session_of(session, request)
        try:
            for text, preview, archive in tab.run(files, phrases_text, fmt, every, session):
                yield text, preview, archive, session
        except UserError as exc:
            gr.Warning(html.escape(str(exc)))  # the files, phrases and last results stay as they were
            yield gr.skip(), gr.skip(), gr.skip(), session

    started = run_button.click(
        gpu(start),
        [files, phrases, fmt, every, state],
        [status, grid, download, state],
        concurrency_id="model",
        concurrency_limit=1,
        api_visibility="private",
        show_progress="minimal",
        show_progress_on=[status],
    )
    stop_button.click(
        tab.stop,
        [state],
        None,
        queue=False,
        api_visibility="private",
        cancels=[started] if on_zerogpu() else None,
    )
    return tab
