"""Labelling jobs (app/label): batching, resuming, skipping, exports, video — through the real job loop."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from app.backends.base import BackendInfo
from app.backends.scripted import ScriptedBackend, demo_script
from app.label.job import LabelJob, queries, run_job
from app.label.journal import JobMismatch, Journal
from app.label.sources import folder_source, video_source
from model.generation import GenerationSettings
from model.processing import Message

PHRASES = ("person", "forklift carrying a pallet")


def scripted() -> ScriptedBackend:
    return ScriptedBackend(demo_script, info=BackendInfo("scripted", "n/a", "cpu"))


def make_folder(root: Path, count: int = 5) -> Path:
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (64 + 8 * index, 48), (index * 40, 90, 200)).save(folder / f"img{index}.png")
    # A phone photo stored sideways: 120×80 pixels, EXIF orientation 6 (seen as 80×120).
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (120, 80), (10, 200, 10)).save(folder / "sub" / "rotated.jpg", exif=exif)
    (folder / "sub" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder


def label(folder: Path, out: Path, backend, *, formats=("coco",), batch_size: int | None = 4, **kw):
    job = LabelJob(folder_source(str(folder)), PHRASES, backend, out, formats=tuple(formats), batch_size=batch_size)
    return run_job(job, **kw)


# -- batching ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_batched_replies_equal_one_at_a_time(variant, loaded_fp32):
    from app.backends.local import LocalBackend

    backend = LocalBackend(loaded_fp32[variant])
    images = [Image.new("RGB", size, color) for size, color in (((96, 64), "red"), ((200, 150), "blue"))]
    conversations = [q for image in images for q in queries(image, PHRASES)]
    # Random weights may end a reply at once; at least 12 tokens each makes every row's decoding count.
    settings = GenerationSettings(max_new_tokens=16, min_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    together = backend.complete_many(conversations, settings)
    alone = ["".join(backend.stream(conversation, settings)) for conversation in conversations]
    assert together == alone
    # Random weights often pick tokens that decode to nothing; some rows must still say something, and the
    # token-level equality of padded and single rows is tests/test_model_forward.py's.
    assert any(together)
    assert 1 <= backend.batch_size(conversations[0], settings) <= 16


def test_find_queries_are_the_apps_find_prompt():
    image = Image.new("RGB", (10, 10))
    (conversation,) = queries(image, ["find all apples"])
    assert conversation == [Message("user", "<|ref|>apples<|/ref|>.", [image])]


# -- a folder job -----------------------------------------------------------------------------------------------


def test_folder_job_writes_every_format_and_skips_the_corrupt_file(tmp_path):
    folder = make_folder(tmp_path)
    out = tmp_path / "out"
    summary = label(folder, out, scripted(), formats=("coco", "yolo", "labelstudio", "jsonl"))
    assert (summary.total, summary.done, summary.skipped, summary.stopped) == (7, 6, 1, False)

    coco = COCO(str(out / "coco.json"))
    assert len(coco.getImgIds()) == 6  # one entry per readable input
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(PHRASES)
    assert len(coco.getAnnIds()) == 12  # the scripted model returns one box per phrase
    rotated = next(i for i in coco.dataset["images"] if i["file_name"].startswith("sub__rotated"))
    assert (rotated["width"], rotated["height"]) == (80, 120)  # as decoded, EXIF applied
    # The dataset copy of the rotated photo is upright (what the boxes refer to); the others are the files.
    with Image.open(out / "images" / rotated["file_name"]) as copy:
        assert copy.size == (80, 120)
    assert (out / "images" / "img0.png").read_bytes() == (folder / "img0.png").read_bytes()

    records = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r["status"] == "skipped"]
    assert [r["key"] for r in skipped] == ["sub/broken.jpg"] and skipped[0]["reason"]
    done = next(r for r in records if r["key"] == "img0.png")
    assert done["results"][0]["raw_text"].startswith("<|ref|>person<|/ref|><|det|>")

    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(
        Path(i["file_name"]).stem + ".txt" for i in coco.dataset["images"]
    )
    assert "forklift carrying a pallet" in (out / "data.yaml").read_text()
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert len(tasks) == 6 and all(t["predictions"][0]["result"] for t in tasks)
    assert len(list((out / "annotated").iterdir())) == 6


def test_each_query_is_one_find_per_image_and_phrase(tmp_path):
    folder = make_folder(tmp_path, count=3)
    backend = scripted()
    label(folder, tmp_path / "out", backend, batch_size=4)
    prompts = sorted(c[0].text for c in backend.conversations)
    assert prompts == sorted(f"<|ref|>{p}<|/ref|>." for p in PHRASES for _ in range(4))  # 4 readable images


class StopsAfter(ScriptedBackend):
    """A scripted model whose user presses Stop (or Ctrl-C) during the ``calls``-th batch."""

    def __init__(self, calls: int, *, interrupt: bool = False) -> None:
        super().__init__(demo_script, info=BackendInfo("scripted", "n/a", "cpu"))
        self.calls_left = calls
        self.interrupt = interrupt

    def complete_many(self, conversations: Sequence[Sequence[Message]], settings, *, cancel_event=None):
        self.calls_left -= 1
        if self.calls_left == 0:
            if self.interrupt:
                raise KeyboardInterrupt
            assert cancel_event is not None
            cancel_event.set()
        return super().complete_many(conversations, settings, cancel_event=cancel_event)


@pytest.mark.parametrize("interrupt", [False, True], ids=["stop", "ctrl-c"])
def test_a_stopped_run_resumes_with_each_image_exactly_once(tmp_path, interrupt):
    folder = make_folder(tmp_path, count=9)  # 11 inputs; 2 images (4 queries) per batch
    out = tmp_path / "out"
    first = label(folder, out, StopsAfter(3, interrupt=interrupt), batch_size=4)
    assert first.stopped and first.done + first.skipped == 4  # two batches kept, the third lost
    backend = scripted()
    second = label(folder, out, backend, batch_size=4)
    assert not second.stopped and second.resumed == 4
    keys = [r.key for r in Journal(out).records()]
    assert sorted(keys) == sorted({*keys}) and len(keys) == 11
    with (out / "journal.jsonl").open() as journal:
        assert len(journal.readlines()) == 11  # nothing written twice
    assert len(backend.conversations) == 2 * 6  # only the 7 not yet done (one of them unreadable)
    assert len(COCO(str(out / "coco.json")).getImgIds()) == 10


def test_a_write_cut_off_by_a_kill_is_done_again_once(tmp_path):
    folder = make_folder(tmp_path, count=3)
    out = tmp_path / "out"
    label(folder, out, scripted())
    lines = (out / "journal.jsonl").read_bytes().splitlines(keepends=True)
    # The process died while writing the last record: half a line, no newline.
    (out / "journal.jsonl").write_bytes(b"".join(lines[:-1]) + lines[-1][:20])
    backend = scripted()
    label(folder, out, backend)
    assert len(backend.conversations) == len(PHRASES)  # just that image again
    records = Journal(out).records()
    assert len(records) == 5 and len({r.key for r in records}) == 5


def test_resuming_with_other_phrases_is_refused(tmp_path):
    folder = make_folder(tmp_path, count=1)
    out = tmp_path / "out"
    label(folder, out, scripted())
    job = LabelJob(folder_source(str(folder)), ("cat",), scripted(), out)
    with pytest.raises(JobMismatch, match="phrases"):
        run_job(job)


def test_a_zip_is_labelled_member_by_member(tmp_path):
    import zipfile

    folder = make_folder(tmp_path, count=2)
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted(folder.rglob("*.*")):
            zipped.write(path, path.relative_to(folder).as_posix())
    summary = label(archive, tmp_path / "out", scripted())
    assert (summary.total, summary.done, summary.skipped) == (4, 3, 1)


def test_cancel_from_another_thread_stops_between_batches(tmp_path):
    folder = make_folder(tmp_path, count=9)
    cancel = threading.Event()
    seen = []

    def progress(update):
        seen.append(update.done)
        if update.done >= 2:
            cancel.set()

    summary = label(folder, tmp_path / "out", scripted(), batch_size=4, cancel=cancel, progress=progress)
    assert summary.stopped and summary.done + summary.skipped == 2 and seen == [0, 2]


# -- video ------------------------------------------------------------------------------------------------------


def write_video(path: Path, frames: int = 25, fps: float = 10.0, size: tuple[int, int] = (96, 64)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for index in range(frames):
        frame = np.zeros((size[1], size[0], 3), np.uint8)
        frame[10:30, 2 + 3 * index : 22 + 3 * index] = (0, 0, 255)  # a red square moving right (BGR)
        writer.write(frame)
    writer.release()
    return path


def test_a_video_is_sampled_labelled_and_written_back_annotated(tmp_path):
    source = write_video(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    job = LabelJob(video_source(source, 0.5), PHRASES, scripted(), out, formats=("coco", "jsonl"), batch_size=4)
    summary = run_job(job)
    assert summary.total == 5 and summary.done == 5  # frames 0, 5, 10, 15, 20 at 10 fps
    records = Journal(out).records()
    assert [r.frame for r in records] == [0, 5, 10, 15, 20]
    assert [r.time_s for r in records] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert all((r.width, r.height) == (96, 64) for r in records)

    annotated = cv2.VideoCapture(summary.exports["video"])
    try:
        assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 25
        assert (annotated.get(cv2.CAP_PROP_FRAME_WIDTH), annotated.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (96, 64)
    finally:
        annotated.release()
    frames = json.loads(Path(summary.exports["frames"]).read_text())
    assert len(frames["frames"]) == 25 and frames["sampled"] == [0, 5, 10, 15, 20]
    assert all(frame["boxes"] for frame in frames["frames"])  # held between samples


# -- the command ------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.label", "--backend", "scripted", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )


def test_the_command_labels_resumes_and_explains_what_it_skipped(tmp_path, capsys):
    from app.label.__main__ import main

    folder = make_folder(tmp_path, count=2)
    out = tmp_path / "out"
    args = ("--images", str(folder), "--find", "person", "--out", str(out), "--format", "coco", "--format", "yolo")
    first = run_cli(*args)  # as a user runs it: python -m app.label
    assert first.returncode == 0, first.stderr
    assert "3 labelled, 1 skipped" in first.stderr and "skipped sub/broken.jpg:" in first.stderr
    assert (out / "coco.json").exists() and (out / "data.yaml").exists()
    assert main([*args, "--backend", "scripted"]) == 0
    assert "(0 this run" in capsys.readouterr().err
    assert main(["--images", str(folder), "--find", "cat", "--out", str(out), "--backend", "scripted"]) == 2
    assert "holds another job" in capsys.readouterr().err
    assert main(["--images", str(tmp_path / "nowhere"), "--find", "cat", "--out", str(out)]) == 2
    assert "no images found" in capsys.readouterr().err


def test_images_added_to_the_folder_are_labelled_on_the_next_run(tmp_path):
    folder = make_folder(tmp_path, count=2)
    out = tmp_path / "out"
    label(folder, out, scripted())
    Image.new("RGB", (50, 40)).save(folder / "new.png")
    backend = scripted()
    summary = label(folder, out, backend)
    assert summary.resumed == 4 and summary.total == 5
    assert [c[0].images[0].size for c in backend.conversations] == [(50, 40)] * len(PHRASES)


def test_a_zip_whose_last_batch_is_partial_loads_every_member(tmp_path):
    import zipfile

    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for index in range(3):  # 2 images a batch: the last batch holds one
            buffer = io.BytesIO()
            Image.new("RGB", (40 + index, 30)).save(buffer, format="PNG")
            zipped.writestr(f"p{index}.png", buffer.getvalue())
    summary = label(archive, tmp_path / "out", scripted(), batch_size=4)
    assert (summary.done, summary.skipped) == (3, 0)
