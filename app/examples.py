"""The example prompts shown under the chat (they fill the inputs; nothing runs at start-up)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .modes import Mode

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"


@dataclass(frozen=True)
class Example:
    label: str
    text: str
    mode: Mode
    files: tuple[str, ...]


def _files(*names: str) -> tuple[str, ...]:
    return tuple(str(EXAMPLES_DIR / name) for name in names)


EXAMPLES: tuple[Example, ...] = (
    Example("Find the cat", "the cat", Mode.FIND, _files("cat.jpg")),
    Example("Find all coins", "find all coins", Mode.FIND, _files("coins.png")),
    Example(
        "Grounded answer",
        "What is the astronaut holding, and what is behind her?",
        Mode.GROUNDED,
        _files("astronaut.jpg"),
    ),
    Example(
        "Compare two images",
        "What do these two pictures have in common, and how do they differ?",
        Mode.ASK,
        _files("coffee.jpg", "rocket.jpg"),
    ),
    Example(
        "Read a chart", "Which month had the highest sales, and how many units?", Mode.ASK, _files("sales_chart.png")
    ),
    Example("Phone photo (EXIF)", "the cat's nose", Mode.FIND, _files("cat_phone_exif_rotated.jpg")),
)
