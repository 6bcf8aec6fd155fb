"""Video for labelling: sample frames, carry boxes between samples, write the annotated MP4 and per-frame JSON.

The model sees a few sampled frames (one every N seconds); every other frame borrows its boxes
from the samples around it: a label's box is held from its sample until the next one, and slides
linearly towards it where the next sample has the same label. That is a drawing aid, not tracking:
the frame JSON says which frames were sampled so nobody mistakes a carried box for a detection.

Frames are always read front to back (``grab()`` past the unwanted ones): seeking by frame index
lands on the wrong frame in many codecs, which would put boxes on frames they were not found in.
"""

from __future__ import annotations

import math
import os
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from .records import ImageRecord, LabelBox

Samples = Mapping[int, Sequence[LabelBox]]
Draw = Callable[[Image.Image, list[LabelBox]], Image.Image]

# Containers without an index report a frame count of 0, negative or absurd; beyond this we count.
_MAX_REPORTED_FRAMES = 2**31


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    frame_count: int
    width: int  # of the decoded frames (rotation metadata applied by the decoder)
    height: int

    @property
    def seconds(self) -> float:
        return self.frame_count / self.fps


# --- reading --------------------------------------------------------------------------------------


def _unreadable(path: str | Path, why: str) -> ValueError:
    return ValueError(f"{Path(path).name} cannot be read as a video ({why})")


def _open(path: str | Path) -> cv2.VideoCapture:
    try:
        capture = cv2.VideoCapture(str(path))
    except cv2.error as error:
        raise _unreadable(path, str(error).strip() or "the decoder failed") from error
    if not capture.isOpened():
        capture.release()
        reason = "no such file" if not Path(path).exists() else "no decoder recognises it"
        raise _unreadable(path, reason)
    return capture


def probe_video(path: str | Path) -> VideoInfo:
    """Frame rate, frame count and decoded size; ValueError("… cannot be read as a video …") otherwise.

    The size is taken from the first decoded frame rather than the container's header, which may
    not reflect rotation metadata the decoder applies.
    """
    capture = _open(path)
    try:
        ok, frame = capture.read()
        if not ok or frame is None:
            raise _unreadable(path, "no frame decodes")
        fps = capture.get(cv2.CAP_PROP_FPS)
        if not (math.isfinite(fps) and fps > 0):
            raise _unreadable(path, "it has no frame rate")
        reported = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        if math.isfinite(reported) and 1 <= reported < _MAX_REPORTED_FRAMES:
            count = round(reported)
        else:
            count = 1 + _count_remaining(capture)
        height, width = frame.shape[:2]
        return VideoInfo(fps=float(fps), frame_count=count, width=int(width), height=int(height))
    finally:
        capture.release()


def _count_remaining(capture: cv2.VideoCapture) -> int:
    count = 0
    while capture.grab():
        count += 1
    return count


def sample_times(info: VideoInfo, every_s: float) -> list[int]:
    """Frame indices to send to the model: frame 0, then the frame nearest every ``every_s`` seconds."""
    if not (math.isfinite(every_s) and every_s > 0):
        raise ValueError(f"the sampling interval must be a positive number of seconds, not {every_s!r}")
    step = every_s * info.fps
    if step <= 1:  # rounding k·step already hits every frame; skip a loop of up to 1/step per frame
        return list(range(info.frame_count))
    indices: list[int] = []
    k = 0
    # Ties round up (not Python's round-half-even), so a 2.5-frame step alternates 2, 3 evenly.
    while (index := math.floor(k * step + 0.5)) < info.frame_count:
        indices.append(index)
        k += 1
    return indices


def _to_rgb(frame: np.ndarray) -> Image.Image:
    code = cv2.COLOR_GRAY2RGB if frame.ndim == 2 else cv2.COLOR_BGR2RGB
    return Image.fromarray(cv2.cvtColor(frame, code))


def read_frames(path: str | Path, indices: Iterable[int]) -> Iterator[tuple[int, Image.Image]]:
    """``(index, RGB image)`` for each wanted frame, in frame order; stops where the stream ends.

    The video is opened when iteration starts (unreadable files raise the ``probe_video`` error then).
    """
    wanted = sorted(set(indices))
    if wanted and wanted[0] < 0:
        raise ValueError(f"frame indices start at 0, not {wanted[0]}")
    capture = _open(path)
    try:
        position = 0
        for index in wanted:
            while position < index:
                if not capture.grab():
                    return  # shorter than announced: headers often overestimate
                position += 1
            ok, frame = capture.read()
            if not ok or frame is None:
                return
            position += 1
            yield index, _to_rgb(frame)
    finally:
        capture.release()


# --- boxes between samples ------------------------------------------------------------------------


def samples_from_records(records: Iterable[ImageRecord]) -> dict[int, list[LabelBox]]:
    """Boxes by frame index from a video job's done records; skipped frames are not samples."""
    return {record.frame: record.boxes for record in records if record.status == "done" and record.frame is not None}


def _by_label(boxes: Sequence[LabelBox]) -> dict[str, list[LabelBox]]:
    """Boxes grouped by label (labels in first-seen order), each group left to right."""
    groups: dict[str, list[LabelBox]] = {}
    for box in boxes:
        groups.setdefault(box.label, []).append(box)
    return {label: sorted(group, key=lambda box: box.xyxy[0]) for label, group in groups.items()}


def _lerp(start: LabelBox, end: LabelBox, t: float) -> LabelBox:
    x1, y1, x2, y2 = (round(a + (b - a) * t, 2) for a, b in zip(start.xyxy, end.xyxy, strict=True))
    n1, n2, n3, n4 = (round(a + (b - a) * t) for a, b in zip(start.norm999, end.norm999, strict=True))
    return LabelBox(start.label, (x1, y1, x2, y2), (n1, n2, n3, n4))


def _between(before: Sequence[LabelBox], after: Sequence[LabelBox], t: float) -> list[LabelBox]:
    """Boxes at fraction ``t`` from one sample to the next: shared labels slide, the rest are held.

    Boxes of a label are paired left to right; when the counts differ the extra boxes of the earlier
    sample are held as they were, and those only in the later sample wait for it.
    """
    targets = _by_label(after)
    boxes: list[LabelBox] = []
    for label, group in _by_label(before).items():
        ends = targets.get(label, [])
        boxes.extend(_lerp(box, end, t) for box, end in zip(group, ends, strict=False))
        boxes.extend(group[len(ends) :])
    return boxes


def track_boxes(samples: Samples, frame_count: int | None = None) -> Callable[[int], list[LabelBox]]:
    """A function giving the boxes to draw on any frame, from the boxes found on the sampled frames.

    Frames before the first sample have none; after the last sample its boxes are held to the end.
    With ``frame_count``, frames outside the video raise IndexError.
    """
    keys = sorted(samples)

    def boxes_at(frame: int) -> list[LabelBox]:
        if frame < 0 or (frame_count is not None and frame >= frame_count):
            raise IndexError(f"frame {frame} is outside the video")
        position = bisect_right(keys, frame) - 1
        if position < 0:
            return []
        start = keys[position]
        if start == frame or position + 1 == len(keys):
            return list(samples[start])
        end = keys[position + 1]
        return _between(samples[start], samples[end], (frame - start) / (end - start))

    return boxes_at


# --- writing --------------------------------------------------------------------------------------


def _annotated(frame: np.ndarray, boxes: list[LabelBox], draw: Draw) -> np.ndarray:
    image = _to_rgb(frame)
    drawn = draw(image, boxes)
    if drawn.size != image.size:  # the writer would silently drop a frame of another size
        raise ValueError(f"draw returned a {drawn.size} image for a {image.size} frame")
    return cv2.cvtColor(np.asarray(drawn.convert("RGB")), cv2.COLOR_RGB2BGR)


def _fit(frame: np.ndarray, info: VideoInfo) -> np.ndarray:
    """BGR at the video's size: a stream may change resolution midway, the MP4 cannot."""
    if frame.ndim == 2:
        frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.shape[:2] != (info.height, info.width):
        frame = cv2.resize(frame, (info.width, info.height), interpolation=cv2.INTER_AREA)
    return frame


def write_annotated_video(src: str | Path, out_path: str | Path, samples: Samples, *, draw: Draw) -> int:
    """Re-read ``src`` front to back and write it as MP4 (mp4v) with each frame's boxes drawn.

    Same frame rate and size as the source; frames without boxes are copied as decoded. The file
    appears under ``out_path`` only once complete. Returns the number of frames written.
    """
    info = probe_video(src)
    boxes_at = track_boxes(samples)  # unbounded: the stream, not the header, says where it ends
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # Ends in .mp4 so OpenCV picks the MP4 container; hidden so nobody picks up a half-written file.
    staging = out_path.with_name(f".{out_path.stem}.{os.getpid()}.tmp.mp4")
    writer = cv2.VideoWriter(str(staging), cv2.VideoWriter.fourcc(*"mp4v"), info.fps, (info.width, info.height))
    if not writer.isOpened():
        raise RuntimeError(f"cannot write an MP4 at {staging} (no mp4v encoder in this OpenCV build?)")
    capture = _open(src)
    written = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok or frame is None:
                break
            frame = _fit(frame, info)
            boxes = boxes_at(written)
            writer.write(_annotated(frame, boxes, draw) if boxes else frame)
            written += 1
        writer.release()
        os.replace(staging, out_path)
    finally:
        writer.release()
        capture.release()
        staging.unlink(missing_ok=True)
    return written


def frame_json(samples: Samples, info: VideoInfo) -> dict[str, Any]:
    """Every frame's boxes (sampled or carried) as data, with the frame's time in seconds."""
    boxes_at = track_boxes(samples, info.frame_count)
    sampled = sorted(index for index in samples if 0 <= index < info.frame_count)
    sampled_set = set(sampled)
    return {
        "fps": info.fps,
        "frame_count": info.frame_count,
        "width": info.width,
        "height": info.height,
        "sampled": sampled,
        "frames": [
            {
                "frame": index,
                "time_s": round(index / info.fps, 3),
                "sampled": index in sampled_set,
                "boxes": [box.to_dict() for box in boxes_at(index)],
            }
            for index in range(info.frame_count)
        ],
    }
