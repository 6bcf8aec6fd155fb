"""One labelled image as data: the unit the journal stores and every export reads.

A record is written once per input image (or sampled video frame), when all its phrases are done,
or when the image could not be read (``status == "skipped"`` with the reason). Boxes follow the
app's coordinate contract: ``xyxy`` in pixels of the image as seen (EXIF applied), ``norm999`` on
the model's 0–999 grid; a box's label is the phrase that was asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["done", "skipped"]


@dataclass(frozen=True)
class LabelBox:
    label: str
    xyxy: tuple[float, float, float, float]
    norm999: tuple[int, int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "xyxy": list(self.xyxy), "norm999": list(self.norm999)}


@dataclass(frozen=True)
class PhraseResult:
    """One Find query on one image: the phrase, the model's exact reply and the boxes read from it."""

    phrase: str
    raw_text: str
    boxes: tuple[LabelBox, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"phrase": self.phrase, "raw_text": self.raw_text, "boxes": [b.to_dict() for b in self.boxes]}


@dataclass(frozen=True)
class ImageRecord:
    """``key`` identifies the input across runs (a relative path, a zip member, ``frame-000123``)."""

    key: str
    name: str
    status: Status
    width: int = 0
    height: int = 0
    results: tuple[PhraseResult, ...] = ()
    reason: str = ""
    frame: int | None = None  # video frames: the frame's index and time in the source
    time_s: float | None = None

    @property
    def boxes(self) -> list[LabelBox]:
        return [box for result in self.results for box in result.boxes]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["results"] = [r.to_dict() for r in self.results]
        return {k: v for k, v in data.items() if v is not None and v != ""}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRecord:
        results = tuple(
            PhraseResult(
                phrase=r["phrase"],
                raw_text=r.get("raw_text", ""),
                boxes=tuple(
                    LabelBox(b["label"], tuple(float(v) for v in b["xyxy"]), tuple(int(v) for v in b["norm999"]))
                    for b in r.get("boxes", [])
                ),
            )
            for r in data.get("results", [])
        )
        return cls(
            key=str(data["key"]),
            name=str(data.get("name", data["key"])),
            status=data.get("status", "done"),
            width=int(data.get("width", 0)),
            height=int(data.get("height", 0)),
            results=results,
            reason=str(data.get("reason", "")),
            frame=data.get("frame"),
            time_s=data.get("time_s"),
        )


@dataclass
class JobSummary:
    """What a run did: counts for the progress line and the final report."""

    total: int
    done: int = 0
    skipped: int = 0
    resumed: int = 0  # records already in the journal when the run started
    seconds: float = 0.0
    stopped: bool = False
    boxes: int = 0
    skipped_inputs: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    exports: dict[str, str] = field(default_factory=dict)
