"""The Label tab's handlers, without a browser: runs, progress, Stop, the zip, and refusals."""

from __future__ import annotations

import threading
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from app.backends.base import BackendInfo
from app.backends.scripted import ScriptedBackend, demo_script
from app.controller import Controller
from app.errors import UserError
from app.label.tab import LabelTab, parse_phrases
from app.limits import Limits
from app.session import Session

from .test_label_job import write_video


class GatedBackend(ScriptedBackend):
    """Scripted Find replies; each batch waits for a permit, so a test decides when batches finish."""

    def __init__(self) -> None:
        super().__init__(demo_script, info=BackendInfo("scripted", "n/a", "cpu"))
        self.permits = threading.Semaphore(0)

    def complete_many(self, conversations, settings, *, cancel_event=None):
        self.permits.acquire()
        return super().complete_many(conversations, settings, cancel_event=cancel_event)


def photos(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"photo{index}.png"
        Image.new("RGB", (80 + index, 60), (200, 40 * index, 90)).save(path)
        paths.append(str(path))
    return paths


def tab_for(backend, tmp_path: Path, **limits) -> LabelTab:
    return LabelTab(Controller(backend, image_dir=tmp_path / "private", limits=Limits(**limits)))


def test_a_run_shows_progress_and_previews_and_ends_with_the_dataset_zip(tmp_path):
    images = photos(tmp_path / "in", 3)
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(images[0], "inside/a.png")
        zipped.writestr("inside/broken.jpg", b"not a JPEG")
    backend = ScriptedBackend(demo_script)
    tab = tab_for(backend, tmp_path)
    updates = list(tab.run([*images, str(archive)], "person\nforklift, person", "yolo", 1.0, Session()))
    status, preview, download = updates[-1]
    assert status.startswith("**Done:** 4 images labelled, 8 boxes, in") and "skipped more/inside/broken.jpg" in status
    assert all(u[2] is None for u in updates[:-1]) and "/ 5** images" in updates[-2][0]
    assert [caption for _, caption in preview] == [f"photo{i}.png: 2 boxes" for i in range(3)] + [
        "more__inside__a.png: 2 boxes"
    ]
    with zipfile.ZipFile(download) as dataset:
        names = set(dataset.namelist())
    root = Path(download).stem
    assert {
        f"{root}/data.yaml",
        f"{root}/labels/photo0.txt",
        f"{root}/images/photo0.png",
        f"{root}/journal.jsonl",
    } <= names
    assert f"{root}/annotated/more__inside__a.jpg" in names and f"{root}/job.json" not in names
    assert sorted(c[0].text for c in backend.conversations)[:1] == ["<|ref|>forklift<|/ref|>."]


def test_stop_ends_the_run_after_the_batch_in_flight_and_keeps_what_was_done(tmp_path):
    backend = GatedBackend()
    tab = tab_for(backend, tmp_path)
    session = Session()
    run = tab.run(photos(tmp_path / "in", 6), "person, car", "coco", 1.0, session)
    assert next(run)[0].startswith("Labelling 6 images")
    assert "0 / 6" in next(run)[0]  # the job has started
    backend.permits.release()  # the first batch (2 images × 2 phrases) finishes
    assert "2 / 6" in next(run)[0]
    tab.stop(session)
    backend.permits.release()  # the second batch sees the Stop
    status, _, download = next(run)
    assert status.startswith("**Stopped** after 2 of 6 images")
    with zipfile.ZipFile(download) as dataset:
        assert sum(name.endswith(".png") and "/images/" in name for name in dataset.namelist()) == 2
    assert list(run) == [] and session.session_id not in tab.running  # that update was the last


def test_a_closed_page_stops_the_run(tmp_path):
    backend = GatedBackend()
    tab = tab_for(backend, tmp_path)
    run = tab.run(photos(tmp_path / "in", 6), "person", "coco", 1.0, Session())
    next(run), next(run)
    backend.permits.release()
    run.close()  # what Gradio does when the page goes away mid-run
    assert not tab.running


@pytest.mark.parametrize(
    ("phrases", "message"),
    [
        ("", "Say what to find"),
        (" , \n", "Say what to find"),
        ("a,b,c", "3 phrases; the limit is 2"),
        ("x" * 30, "the limit is 20"),
    ],
)
def test_bad_phrases_are_explained(phrases, message):
    with pytest.raises(UserError, match=message):
        parse_phrases(phrases, max_phrases=2, max_chars=20)


def test_refusals_say_what_to_do(tmp_path):
    tab = tab_for(ScriptedBackend(demo_script), tmp_path, max_label_images=3)
    session = Session()
    images = photos(tmp_path / "in", 4)
    video = str(write_video(tmp_path / "clip.mp4", frames=40, fps=10.0))
    cases = [
        ([], "Drop images"),
        (images, "4 images; this page labels at most 3"),
        ([video, images[0]], "one video at a time"),
        ([video], "gives 4 frames; this page labels at most 3"),
    ]
    for files, message in cases:
        with pytest.raises(UserError, match=message):
            next(tab.run(files, "person", "coco", 1.0, session))
    with pytest.raises(UserError, match="how often"):
        next(tab.run([video], "person", "coco", 0, session))
    with pytest.raises(UserError, match="Choose a format"):
        next(tab.run(images[:1], "person", "pascal", 1.0, session))
    assert not tab.running


def test_a_video_run_zips_the_frames_the_annotated_video_and_its_frame_json(tmp_path):
    tab = tab_for(ScriptedBackend(demo_script), tmp_path)
    video = str(write_video(tmp_path / "clip.mp4", frames=20, fps=10.0))
    status, preview, download = list(tab.run([video], "person", "labelstudio", 0.5, Session()))[-1]
    assert status.startswith("**Done:** 4 images labelled") and "4 frames of clip.mp4" in status
    assert len(preview) == 4
    with zipfile.ZipFile(download) as dataset:
        names = {name.split("/", 1)[1] for name in dataset.namelist()}
    assert {"annotated.mp4", "frames.json", "labelstudio.json", "images/frame-000005.png"} <= names


def test_phrases_are_plain_words_not_the_models_tags():
    with pytest.raises(UserError, match="plain words"):
        parse_phrases("cat, <|ref|>dog<|/ref|>", max_phrases=5, max_chars=50)


def test_a_file_and_a_zip_member_that_flatten_alike_stay_two_images(tmp_path):
    images = photos(tmp_path / "in", 2)
    alike = tmp_path / "more__photo0.png"
    Image.new("RGB", (30, 30), "blue").save(alike)
    archive = tmp_path / "more.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(images[0], "photo0.png")
    tab = tab_for(ScriptedBackend(demo_script), tmp_path)
    _, _, download = list(tab.run([str(alike), str(archive)], "person", "coco", 1.0, Session()))[-1]
    with zipfile.ZipFile(download) as dataset:
        copies = sorted(name.split("/images/")[1] for name in dataset.namelist() if "/images/" in name)
    assert copies == ["more__photo0-2.png", "more__photo0.png"]
