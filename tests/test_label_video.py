"""Video labelling: probing, sampling every N seconds, sequential reads, boxes between samples, the MP4 out."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw

from app.label.records import ImageRecord, LabelBox, PhraseResult
from app.label.video import (
    VideoInfo,
    frame_json,
    probe_video,
    read_frames,
    sample_times,
    samples_from_records,
    track_boxes,
    write_annotated_video,
)

FPS, FRAMES, WIDTH, HEIGHT = 10, 25, 64, 48
SQUARE = 10  # a red square moving 2 px right per frame on a dark background


def _square_x(frame: int) -> int:
    return 2 * frame


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for frame in range(FRAMES):
        bgr = np.full((HEIGHT, WIDTH, 3), 20, np.uint8)
        x = _square_x(frame)
        bgr[19 : 19 + SQUARE, x : x + SQUARE] = (0, 0, 255)  # red in OpenCV's BGR
        writer.write(bgr)
    writer.release()
    return path


def _box(label: str, x1: float, y1: float = 0.0, x2: float | None = None, y2: float = 10.0) -> LabelBox:
    x2 = x1 + 10 if x2 is None else x2
    return LabelBox(label, (x1, y1, x2, y2), (round(x1), round(y1), round(x2), round(y2)))


def test_probe_reports_rate_count_and_size(clip: Path):
    info = probe_video(clip)
    assert info == VideoInfo(fps=10.0, frame_count=25, width=64, height=48)
    assert info.seconds == pytest.approx(2.5)


@pytest.mark.parametrize("content", [os.urandom(4096), b""])
def test_unreadable_files_give_a_clear_error(tmp_path: Path, content: bytes):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(content)
    with pytest.raises(ValueError, match=r"junk\.mp4 cannot be read as a video"):
        probe_video(junk)
    with pytest.raises(ValueError, match="cannot be read as a video"):
        list(read_frames(junk, [0]))
    with pytest.raises(ValueError, match="cannot be read as a video"):
        probe_video(tmp_path / "missing.mp4")


def test_sampling_every_half_second(clip: Path):
    assert sample_times(probe_video(clip), 0.5) == [0, 5, 10, 15, 20]


def test_sampling_edges():
    info = VideoInfo(fps=29.97, frame_count=100, width=1, height=1)
    assert sample_times(info, 1.0) == [0, 30, 60, 90]
    assert sample_times(info, 100.0) == [0]  # shorter than one interval: the first frame only
    assert sample_times(VideoInfo(10, 5, 1, 1), 0.01) == [0, 1, 2, 3, 4]  # finer than the frame rate
    assert sample_times(VideoInfo(10, 11, 1, 1), 0.25) == [0, 3, 5, 8, 10]  # 2.5-frame steps, ties up
    assert sample_times(VideoInfo(10, 0, 1, 1), 1.0) == []
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="positive"):
            sample_times(info, bad)


def test_frames_read_back_in_order_as_rgb(clip: Path):
    frames = list(read_frames(clip, [10, 0, 5, 10]))
    assert [index for index, _ in frames] == [0, 5, 10]
    for index, image in frames:
        assert image.mode == "RGB" and image.size == (WIDTH, HEIGHT)
        red, green, blue = image.getpixel((_square_x(index) + SQUARE // 2, 19 + SQUARE // 2))
        assert red > 180 and green < 80 and blue < 80  # red, so BGR was converted
        assert max(image.getpixel((WIDTH - 3, 3))) < 60  # background away from the square


def test_reading_stops_where_the_stream_ends(clip: Path):
    assert [index for index, _ in read_frames(clip, [24, 25, 400])] == [24]


def test_boxes_slide_linearly_between_samples_of_the_same_label():
    boxes_at = track_boxes({0: [_box("cat", 0)], 10: [_box("cat", 20, 10, 40, 30)]}, 20)
    assert boxes_at(0) == [_box("cat", 0)]
    middle = boxes_at(5)
    assert middle == [LabelBox("cat", (10.0, 5.0, 25.0, 20.0), (10, 5, 25, 20))]
    for frame in range(11):
        (box,) = boxes_at(frame)
        assert box.xyxy[0] == pytest.approx(2 * frame)  # a straight line, frame by frame
    assert boxes_at(10) == [_box("cat", 20, 10, 40, 30)]
    assert boxes_at(19) == boxes_at(10)  # after the last sample: held to the end
    with pytest.raises(IndexError):
        boxes_at(20)


def test_labels_absent_from_the_next_sample_are_held_then_drop():
    boxes_at = track_boxes({0: [_box("cat", 0), _box("dog", 30)], 10: [_box("dog", 40)]})
    assert boxes_at(9) == [_box("cat", 0), _box("dog", 39)]  # cat held, dog slides
    assert boxes_at(10) == [_box("dog", 40)]  # cat is not in this sample: gone
    # A label that first appears in a later sample waits for it.
    assert track_boxes({0: [], 10: [_box("bird", 5)]})(9) == []


def test_unequal_counts_pair_left_to_right_and_hold_the_rest():
    # Given out of order on purpose: pairing is by x1, not by the model's listing order.
    boxes_at = track_boxes({0: [_box("cat", 50), _box("cat", 0)], 10: [_box("cat", 20)]})
    assert boxes_at(5) == [_box("cat", 10), _box("cat", 50)]
    # More boxes later than before: the extra later one waits for its sample.
    boxes_at = track_boxes({0: [_box("cat", 0)], 10: [_box("cat", 40), _box("cat", 20)]})
    assert boxes_at(5) == [_box("cat", 10)]


def test_no_boxes_before_the_first_sample():
    boxes_at = track_boxes({5: [_box("cat", 0)]})
    assert boxes_at(4) == []
    assert boxes_at(5) == [_box("cat", 0)]


def _fill_green(image: Image.Image, boxes: list[LabelBox]) -> Image.Image:
    drawn = image.copy()
    canvas = ImageDraw.Draw(drawn)
    for box in boxes:
        canvas.rectangle(tuple(round(v) for v in box.xyxy), fill=(0, 255, 0))
    return drawn


def test_annotated_video_keeps_rate_count_and_size(clip: Path, tmp_path: Path):
    out = tmp_path / "out" / "clip.annotated.mp4"
    # A box only on the right half from frame 10: earlier frames are copied untouched.
    samples = {0: [], 10: [_box("cat", 40, 30, 60, 46)]}

    assert write_annotated_video(clip, out, samples, draw=_fill_green) == FRAMES
    assert probe_video(out) == probe_video(clip)
    assert sorted(p.name for p in out.parent.iterdir()) == ["clip.annotated.mp4"]  # no staging file left
    frames = dict(read_frames(out, [5, 15]))
    red, green, blue = frames[15].getpixel((50, 38))
    assert green > 180 and red < 80 and blue < 80
    assert max(frames[5].getpixel((50, 38))) < 60  # no box drawn before its sample
    red, _, _ = frames[15].getpixel((_square_x(15) + SQUARE // 2, 19 + SQUARE // 2))
    assert red > 180  # the source's own content is still there


def test_a_draw_that_changes_the_size_is_refused(clip: Path, tmp_path: Path):
    out = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match="draw returned"):
        write_annotated_video(clip, out, {0: [_box("cat", 0)]}, draw=lambda image, boxes: image.resize((8, 8)))
    assert not list(tmp_path.iterdir())  # neither the output nor its staging file


def test_frame_json_covers_every_frame(clip: Path):
    info = probe_video(clip)
    records = [
        ImageRecord("frame-000000", "clip.mp4", "done", 64, 48, (PhraseResult("cat", "", (_box("cat", 0),)),), frame=0),
        ImageRecord("frame-000005", "clip.mp4", "skipped", reason="decode error", frame=5),
        ImageRecord(
            "frame-000010", "clip.mp4", "done", 64, 48, (PhraseResult("cat", "", (_box("cat", 20),)),), frame=10
        ),
    ]
    samples = samples_from_records(records)
    assert sorted(samples) == [0, 10]  # a skipped frame is not a sample: boxes carry across it

    document = frame_json(samples, info)
    assert {key: document[key] for key in ("fps", "frame_count", "width", "height", "sampled")} == {
        "fps": 10.0,
        "frame_count": 25,
        "width": 64,
        "height": 48,
        "sampled": [0, 10],
    }
    frames = document["frames"]
    assert [frame["frame"] for frame in frames] == list(range(25))
    assert frames[5] == {
        "frame": 5,
        "time_s": 0.5,
        "sampled": False,
        "boxes": [{"label": "cat", "xyxy": [10.0, 0.0, 20.0, 10.0], "norm999": [10, 0, 20, 10]}],
    }
    assert frames[10]["sampled"] is True
    assert frames[24]["boxes"] == frames[10]["boxes"]
