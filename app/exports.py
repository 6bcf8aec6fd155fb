"""Results as data: a documented JSON document, COCO detections, and the annotated PNG.

JSON schema (``"schema": "vl2-grounding-studio/1"``)::

    {
      "schema": "vl2-grounding-studio/1",
      "model": {"id": str, "precision": str, "device": str},
      "images": [{"index": int, "name": str, "width": int, "height": int}],   # size after EXIF transpose
      "turns": [{
          "index": int, "kind": "chat" | "click", "mode": str,
          "prompt": str,            # what the model was sent (grounding tokens included)
          "user_text": str,         # what the user typed
          "raw_text": str,          # the model's exact reply
          "image_index": int | null,# the image the boxes are on
          "boxes": [{"id": int, "label": str, "image_index": int,
                     "xyxy": [x1, y1, x2, y2],       # pixels on the image as seen (floats)
                     "norm999": [x1, y1, x2, y2]}], # the model's 0–999 values
          "rejected": [{"text": str, "reason": str, "span": [start, end]}]
      }]
    }

COCO follows the detection results layout: ``images``, ``annotations`` (``bbox`` is
``[x, y, width, height]`` in pixels, ``area``, ``iscrowd: 0``) and ``categories`` (one per label).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from .backends.base import BackendInfo
from .session import Session, Turn
from .views import annotated_view, save_atomically

SCHEMA = "vl2-grounding-studio/1"


def box_records(session: Session, turn: Turn, first_id: int = 1) -> list[dict[str, Any]]:
    """A turn's boxes in the document's form (ids numbered from ``first_id``): one shape everywhere."""
    keys = list(session.images)
    image_index = keys.index(turn.target_image) if turn.target_image in session.images else None
    return [
        {
            "id": first_id + offset,
            "label": box.label or "object",
            "image_index": image_index,
            "xyxy": [round(v, 2) for v in box.xyxy],
            "norm999": list(box.norm999),
        }
        for offset, box in enumerate(turn.boxes)
    ]


def session_document(session: Session, info: BackendInfo) -> dict[str, Any]:
    keys = list(session.images)
    images = []
    for index, key in enumerate(keys):
        width, height = session.images[key].size
        images.append({"index": index, "name": session.images[key].name, "width": width, "height": height})
    turns = []
    next_id = 1
    for index, turn in enumerate(session.turns):
        image_index = keys.index(turn.target_image) if turn.target_image in session.images else None
        boxes = box_records(session, turn, next_id)
        next_id += len(boxes)
        turns.append(
            {
                "index": index,
                "kind": turn.kind,
                "mode": str(turn.mode),
                "prompt": turn.prompt,
                "user_text": turn.user_text,
                "raw_text": turn.reply,
                "image_index": image_index,
                "boxes": boxes,
                "rejected": [r.to_dict() for r in turn.rejected],
            }
        )
    return {
        "schema": SCHEMA,
        "model": {"id": info.model_id, "precision": info.precision, "device": info.device},
        "images": images,
        "turns": turns,
    }


def coco_from_document(document: dict[str, Any]) -> dict[str, Any]:
    """COCO detections (ids start at 1) from a studio JSON document."""
    categories: dict[str, int] = {}
    annotations = []
    for turn in document["turns"]:
        for box in turn["boxes"]:
            if box["image_index"] is None:
                continue
            category = categories.setdefault(box["label"], len(categories) + 1)
            x1, y1, x2, y2 = box["xyxy"]
            width, height = max(0.0, x2 - x1), max(0.0, y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": box["image_index"] + 1,
                    "category_id": category,
                    "bbox": [round(x1, 2), round(y1, 2), round(width, 2), round(height, 2)],
                    "area": round(width * height, 2),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": "DeepSeek-VL2 grounding exported by VL2 Grounding Studio", "version": SCHEMA},
        "images": [
            {"id": image["index"] + 1, "file_name": image["name"], "width": image["width"], "height": image["height"]}
            for image in document["images"]
        ],
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "object"} for name, cid in categories.items()],
    }


def write_json(document: dict[str, Any], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(document, indent=2, ensure_ascii=False), encoding="utf-8")
    staging.replace(path)
    return str(path)


def annotated_png(session: Session, key: str, *, last_use: bool = False) -> bytes:
    """The image at full resolution with its visible boxes (no pins), encoded as PNG.

    ``last_use``: the session's image is not needed afterwards (a one-call API session), so the
    boxes are drawn on it rather than on a copy.
    """
    buffer = io.BytesIO()
    drawn = annotated_view(session, key, full_resolution=True, in_place=last_use)
    drawn.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_annotated_png(session: Session, key: str, path: Path) -> str:
    """The image at full resolution with its visible boxes (no pins), as PNG."""
    save_atomically(annotated_view(session, key, full_resolution=True), path)
    return str(path)
