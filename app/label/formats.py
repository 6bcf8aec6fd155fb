"""Dataset exports of a labelling job: COCO, YOLO, Label Studio tasks and the raw JSON lines.

Every export reads the same records (``app/label/records.py``) and the job's phrase list; a phrase's
position in that list is its category everywhere (COCO ids from 1, YOLO classes from 0), so two
exports of one job agree. Only records with ``status == "done"`` are images of a dataset; skipped
ones appear in the JSON lines alone, with their reason.

Boxes are clamped to the image before export: the model's 0–999 grid can land a hair outside the
decoded size, and YOLO and Label Studio reject values outside 0–1 / 0–100.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from .records import ImageRecord, LabelBox

FORMATS = ("coco", "yolo", "labelstudio", "jsonl")
MODEL_VERSION = "deepseek-vl2"

# Characters a YAML reader folds or rejects inside a double-quoted scalar although JSON leaves them
# raw: C1 controls and DEL (non-printable to YAML), NEL/LS/PS (YAML line breaks), the BOM, and
# surrogates (lone ones cannot be encoded). json.dumps already escapes C0 controls.
_YAML_UNSAFE = {chr(c) for c in range(0x7F, 0xA0)} | {"\u2028", "\u2029", "\ufeff"}

# Attribute values lose tabs and line breaks to whitespace normalisation unless written as references.
_XML_ATTR_ENTITIES = {'"': "&quot;", "\n": "&#10;", "\r": "&#13;", "\t": "&#9;"}


# --- shared helpers -------------------------------------------------------------------------------


def _done(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    return [record for record in records if record.status == "done"]


def _category_index(phrases: Sequence[str]) -> dict[str, int]:
    """Phrase → position; duplicates would make a box's label ambiguous, so they are refused."""
    index: dict[str, int] = {}
    for position, phrase in enumerate(phrases):
        if phrase in index:
            raise ValueError(f"phrase {phrase!r} is listed twice; each phrase must be one category")
        index[phrase] = position
    return index


def _category_of(box: LabelBox, index: dict[str, int], record: ImageRecord) -> int:
    try:
        return index[box.label]
    except KeyError:
        # A silent drop would publish a dataset that misses boxes; the phrase list is wrong instead.
        raise ValueError(f"{record.key}: box label {box.label!r} is not one of the job's phrases") from None


def _clamped(box: LabelBox, width: int, height: int) -> tuple[float, float, float, float]:
    """The box ordered (x1 <= x2, y1 <= y2) and inside the image."""
    x1, y1, x2, y2 = box.xyxy
    left, right = sorted((min(max(x1, 0.0), width), min(max(x2, 0.0), width)))
    top, bottom = sorted((min(max(y1, 0.0), height), min(max(y2, 0.0), height)))
    return left, top, right, bottom


def _require_size(record: ImageRecord) -> None:
    # Normalised formats divide by the size; a done record without one is a bug upstream.
    if record.width <= 0 or record.height <= 0:
        raise ValueError(f"{record.key}: a done record needs its decoded width and height")


def _name_for(record: ImageRecord, names: dict[str, str], what: str) -> str:
    try:
        return names[record.key]
    except KeyError:
        raise ValueError(f"{record.key}: no {what} given for this image") from None


def _write_atomically(path: Path, text: str) -> Path:
    """Write under a temporary name, then rename: a reader never sees a half-written export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        staging.write_text(text, encoding="utf-8", newline="\n")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


# --- COCO -----------------------------------------------------------------------------------------


def coco(
    records: Iterable[ImageRecord], phrases: Sequence[str], *, file_names: dict[str, str] | None = None
) -> dict[str, Any]:
    """COCO instances: one image per done record (ids from 1, in record order), one category per phrase.

    ``file_names`` maps ``record.key`` to the image's file name in the dataset; ``record.name`` otherwise.
    Sizes are the decoded ones (EXIF applied), the frame the boxes are in.
    """
    index = _category_index(phrases)
    images, annotations = [], []
    for image_id, record in enumerate(_done(records), start=1):
        file_name = (file_names or {}).get(record.key, record.name)
        images.append({"id": image_id, "file_name": file_name, "width": record.width, "height": record.height})
        for box in record.boxes:
            annotations.append(_coco_annotation(box, record, image_id, index, len(annotations) + 1))
    return {
        "info": {"description": "Labelled with DeepSeek-VL2 by VL2 Grounding Studio", "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": position + 1, "name": phrase, "supercategory": "object"} for position, phrase in enumerate(phrases)
        ],
    }


def _coco_annotation(
    box: LabelBox, record: ImageRecord, image_id: int, index: dict[str, int], annotation_id: int
) -> dict[str, Any]:
    x1, y1, x2, y2 = _clamped(box, record.width, record.height)
    width, height = x2 - x1, y2 - y1
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": _category_of(box, index, record) + 1,
        "bbox": [round(x1, 2), round(y1, 2), round(width, 2), round(height, 2)],
        "area": round(width * height, 2),
        "iscrowd": 0,
    }


# --- YOLO -----------------------------------------------------------------------------------------


def yolo_lines(record: ImageRecord, index: dict[str, int]) -> list[str]:
    """``class cx cy w h``, normalised to 0–1, one line per box of one done record."""
    _require_size(record)
    lines = []
    for box in record.boxes:
        x1, y1, x2, y2 = _clamped(box, record.width, record.height)
        cx, cy = (x1 + x2) / 2 / record.width, (y1 + y2) / 2 / record.height
        w, h = (x2 - x1) / record.width, (y2 - y1) / record.height
        lines.append(f"{_category_of(box, index, record)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def yaml_string(text: str) -> str:
    """A double-quoted YAML scalar for any text: a JSON string, with what YAML treats differently escaped."""
    quoted = json.dumps(text, ensure_ascii=False)
    # Surrogates and the characters above are all in the BMP, so \uXXXX is valid in JSON and YAML alike.
    return "".join(f"\\u{ord(ch):04x}" if ch in _YAML_UNSAFE or 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in quoted)


def data_yaml(phrases: Sequence[str]) -> str:
    """Ultralytics' dataset file: images and labels side by side, the same images for train and val."""
    # An empty list must still be a list (``names: []``), not a null.
    names = "".join(f"\n  - {yaml_string(phrase)}" for phrase in phrases) if phrases else " []"
    return (
        "# Written by VL2 Grounding Studio. Review the labels before training.\n"
        "path: .\n"
        "train: images\n"
        "val: images\n"
        f"nc: {len(phrases)}\n"
        f"names:{names}\n"
    )


def write_yolo(
    records: Iterable[ImageRecord], phrases: Sequence[str], out_dir: Path, *, image_names: dict[str, str]
) -> list[Path]:
    """``labels/<stem>.txt`` per done record (empty when it has no boxes: a negative) and ``data.yaml``.

    ``image_names`` maps ``record.key`` to the image's file name under ``images/``; YOLO pairs an
    image with its label file by stem, so stems must be unique.
    """
    index = _category_index(phrases)
    done = _done(records)
    stems: dict[str, str] = {}
    for record in done:
        stem = Path(_name_for(record, image_names, "image name")).stem
        if stem in stems:
            raise ValueError(f"{record.key} and {stems[stem]} would share the label file {stem}.txt")
        stems[stem] = record.key
    written = []
    for stem, record in zip(stems, done, strict=True):
        lines = yolo_lines(record, index)
        text = "".join(f"{line}\n" for line in lines)
        written.append(_write_atomically(out_dir / "labels" / f"{stem}.txt", text))
    written.append(_write_atomically(out_dir / "data.yaml", data_yaml(phrases)))
    return written


# --- Label Studio ---------------------------------------------------------------------------------


def label_studio(
    records: Iterable[ImageRecord], phrases: Sequence[str], *, image_urls: dict[str, str]
) -> list[dict[str, Any]]:
    """Label Studio import tasks, one per done record, the boxes as the model's predictions.

    Follows Label Studio's pre-annotation format: values in percent of the image, ``original_width``
    and ``original_height`` the decoded size, a result id unique in the file. No ``score``: the model
    gives none. A record without boxes still gets its (empty) prediction, so reviewers see it ran.
    """
    index = _category_index(phrases)
    tasks = []
    for task_number, record in enumerate(_done(records), start=1):
        _require_size(record)
        url = _name_for(record, image_urls, "image URL")
        result = [
            _label_studio_region(box, record, index, f"t{task_number}-b{number}")
            for number, box in enumerate(record.boxes, start=1)
        ]
        tasks.append({"data": {"image": url}, "predictions": [{"model_version": MODEL_VERSION, "result": result}]})
    return tasks


def _label_studio_region(box: LabelBox, record: ImageRecord, index: dict[str, int], region_id: str) -> dict[str, Any]:
    _category_of(box, index, record)  # the config lists the phrases only: refuse any other label
    x1, y1, x2, y2 = _clamped(box, record.width, record.height)
    return {
        "id": region_id,
        "type": "rectanglelabels",
        "from_name": "label",
        "to_name": "image",
        "original_width": record.width,
        "original_height": record.height,
        "image_rotation": 0,
        "value": {
            "x": round(x1 / record.width * 100, 4),
            "y": round(y1 / record.height * 100, 4),
            "width": round((x2 - x1) / record.width * 100, 4),
            "height": round((y2 - y1) / record.height * 100, 4),
            "rotation": 0,
            "rectanglelabels": [box.label],
        },
    }


def label_studio_config(phrases: Sequence[str]) -> str:
    """The labelling config the tasks above expect (names ``image`` and ``label``), values escaped."""
    _category_index(phrases)
    labels = "".join(f'    <Label value="{escape(phrase, _XML_ATTR_ENTITIES)}"/>\n' for phrase in phrases)
    return (
        "<View>\n"
        '  <Image name="image" value="$image"/>\n'
        '  <RectangleLabels name="label" toName="image">\n'
        f"{labels}"
        "  </RectangleLabels>\n"
        "</View>\n"
    )


# --- JSON lines -----------------------------------------------------------------------------------


def jsonl_lines(records: Iterable[ImageRecord]) -> Iterator[str]:
    """One JSON document per record, skipped ones included, the model's raw text kept.

    Each string is one line *without* its newline (JSON never contains a raw one).
    """
    for record in records:
        yield json.dumps(record.to_dict(), ensure_ascii=False)


# --- all at once ----------------------------------------------------------------------------------


def write_exports(
    records: Iterable[ImageRecord],
    phrases: Sequence[str],
    out_dir: Path,
    formats: Sequence[str],
    *,
    image_names: dict[str, str],
) -> dict[str, Path]:
    """Write the chosen formats into ``out_dir``, each file atomically; return them by name.

    Keys: ``coco`` → coco.json, ``yolo`` → data.yaml (``yolo_labels`` → the labels folder),
    ``labelstudio`` → labelstudio.json (``labelstudio_config`` → labelstudio_config.xml),
    ``jsonl`` → labels.jsonl. Image paths are relative to ``out_dir`` (URL-encoded for Label Studio):
    the job copies the images to ``images/<name>``, ``image_names`` giving each record's name there.
    """
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:  # before writing anything: a typo should not leave half an export
        raise ValueError(f"unknown export format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    records = list(records)
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    if "coco" in formats:
        document = coco(records, phrases, file_names=image_names)
        written["coco"] = _write_atomically(out_dir / "coco.json", json.dumps(document, indent=2, ensure_ascii=False))
    if "yolo" in formats:
        written["yolo"] = write_yolo(records, phrases, out_dir, image_names=image_names)[-1]
        written["yolo_labels"] = out_dir / "labels"
    if "labelstudio" in formats:
        # Relative URLs, resolved by the browser: a space, "#" or "?" in a file name must be encoded.
        urls = {key: f"images/{quote(name)}" for key, name in image_names.items()}
        tasks = label_studio(records, phrases, image_urls=urls)
        written["labelstudio"] = _write_atomically(
            out_dir / "labelstudio.json", json.dumps(tasks, indent=2, ensure_ascii=False)
        )
        written["labelstudio_config"] = _write_atomically(
            out_dir / "labelstudio_config.xml", label_studio_config(phrases)
        )
    if "jsonl" in formats:
        text = "".join(f"{line}\n" for line in jsonl_lines(records))
        written["jsonl"] = _write_atomically(out_dir / "labels.jsonl", text)
    return written
