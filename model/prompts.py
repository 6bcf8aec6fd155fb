"""The prompt shapes DeepSeek-VL2 was trained on for grounding (README and official demo)."""

from __future__ import annotations

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
GROUNDING = "<|grounding|>"


def find_prompt(phrase: str) -> str:
    """Visual grounding: boxes for ``phrase`` (``<|ref|>phrase<|/ref|>.``)."""
    phrase = phrase.strip()
    if not phrase:
        raise ValueError("say what to find, e.g. 'the red car'")
    if REF_OPEN in phrase:
        return phrase
    return f"{REF_OPEN}{phrase}{REF_CLOSE}."


def grounded_answer_prompt(question: str) -> str:
    """Grounded conversation: an answer whose phrases carry boxes."""
    question = question.strip()
    return question if question.startswith(GROUNDING) else f"{GROUNDING}{question}"
