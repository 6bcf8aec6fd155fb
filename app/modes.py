"""Ask / Find / Grounded answer: the user types plain words, the app adds the grounding tokens."""

from __future__ import annotations

import re
from enum import StrEnum

from model.prompts import GROUNDING, REF_OPEN, find_prompt, grounded_answer_prompt


class Mode(StrEnum):
    ASK = "Ask"
    FIND = "Find"
    GROUNDED = "Grounded answer"


MODE_HELP = {
    Mode.ASK: "Ask anything about the image(s).",
    Mode.FIND: "Name what to find — e.g. “the red car” or “find all apples”; boxes come back.",
    Mode.GROUNDED: "Ask a question; the answer's phrases come with boxes.",
}

_FIND_ALL = re.compile(r"^\s*(?:find|locate|detect|show)\s+(?:me\s+)?all(?:\s+(?:the|of\s+the))?\s+", re.IGNORECASE)


def build_prompt(mode: Mode | str, text: str) -> str:
    """The model prompt for what the user typed. Raw special tokens typed by the user are kept."""
    mode = Mode(mode)
    text = text.strip()
    if REF_OPEN in text or text.startswith(GROUNDING) or mode is Mode.ASK:
        return text
    if mode is Mode.FIND:
        # "find all apples" → <|ref|>apples<|/ref|>; the model returns every instance for a plural ref.
        return find_prompt(_FIND_ALL.sub("", text) or text)
    return grounded_answer_prompt(text)
