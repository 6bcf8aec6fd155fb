"""Turn DeepSeek-VL2 grounding answers into pixel boxes, without ever trusting the model text.

A grounding answer looks like::

    <|ref|>the cat<|/ref|><|det|>[[12, 40, 500, 980], [600, 10, 999, 400]]<|/det|><｜end▁of▁sentence｜>

and a grounded conversation (prompt starting with ``<|grounding|>``) interleaves prose with several
``<|ref|>…<|/ref|><|det|>…<|/det|>`` pairs. Coordinates are integers 0..999 relative to the original
image, so a value ``v`` maps to ``v / 999 * W`` (x) or ``v / 999 * H`` (y) pixels.

How the text is read
--------------------
The text is split on the literal tags ``<|ref|>``, ``<|/ref|>``, ``<|det|>``, ``<|/det|>``,
``<|grounding|>`` and the end-of-sentence marker; everything else is prose. One left-to-right pass over
the tags drives a small state machine (outside / inside a ref / inside a det), so the cost is linear in
the text and nothing ever backtracks.

Pairing rule (which ref labels which det):
  * A ``<|det|>`` takes the label of the most recent *closed* ``<|ref|>…<|/ref|>`` that no det has
    taken yet. Any prose may lie between the two (``<|/ref|> is at <|det|>`` still pairs), but not
    another det and not another ``<|ref|>``.
  * Each ref labels at most one det. A second det right after the first has no label (``label=None``).
  * Opening a new ``<|ref|>`` while an earlier closed ref is still waiting for its det gives up on the
    earlier one: it is reported as ``"ref without boxes"`` at once. A waiting ref still unpaired when a
    final parse ends is reported the same way.
  * ``ref_index`` numbers the groups of the answer from 0: every closed ref starts a group, and so
    does every det that found no ref to pair with. All boxes of one det share the group's index; a group
    whose ref never got a det simply has no boxes.
  * ``Box.span`` is the ``<|ref|>…<|/ref|>`` span of the label, or the ``<|det|>…<|/det|>`` span when
    the det has no ref.

Broken markup:
  * Any tag other than the matching close tag ends an open ref or det early; that ref or det is
    reported as ``"unclosed <|ref|>"`` / ``"unclosed <|det|>"`` and the interrupting tag is then read
    normally. A ref or det still open at the end of the text is *pending* when ``final=False`` (nothing
    reported, no boxes) and reported as unclosed when ``final=True``.
  * A close tag with nothing open is reported and otherwise ignored.

Inside a det:
  * ``[[x1, y1, x2, y2], …]`` and a single flat ``[x1, y1, x2, y2]`` are both accepted (several
    top-level lists are read one after the other). A box is exactly four comma-separated integers with
    an optional leading minus and at most 4 digits; whitespace and newlines are free.
  * Every bad box (wrong count, floats, words, empty values, runaway digits, empty list, deeper
    nesting, missing ``]``) is reported on its own and the good boxes of the same det are kept. Stray
    text between boxes and a stray ``]`` are reported too.
  * Values above 999 are clamped to 999, negatives to 0, and reversed corners are swapped.

Labels are kept verbatim apart from stripping surrounding whitespace: any script, emoji, or markup such
as ``<script>`` stays plain text — escaping is the renderer's job.

Boxes appear as soon as the ``<|/det|>`` closing them is read, and reading more text never changes a box
already produced, which is what lets :class:`StreamingGroundingParser` return exactly the boxes of
:func:`parse_grounding` whatever way the text is chopped into deltas.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_MAX_BOXES",
    "Box",
    "GroundingResult",
    "Rejected",
    "StreamingGroundingParser",
    "parse_grounding",
    "strip_grounding_tags",
]

DEFAULT_MAX_BOXES = 1000
MAX_TEXT_CHARS = 200  # longest Rejected.text
_MAX_VALUE = 999
_MAX_DIGITS = 4

REF_OPEN, REF_CLOSE = "<|ref|>", "<|/ref|>"
DET_OPEN, DET_CLOSE = "<|det|>", "<|/det|>"
GROUNDING = "<|grounding|>"
EOS = "<｜end▁of▁sentence｜>"

_REF_OPEN, _REF_CLOSE, _DET_OPEN, _DET_CLOSE, _GROUNDING, _EOS = range(6)
_KINDS = {REF_OPEN: _REF_OPEN, REF_CLOSE: _REF_CLOSE, DET_OPEN: _DET_OPEN, DET_CLOSE: _DET_CLOSE}
_KINDS |= {GROUNDING: _GROUNDING, EOS: _EOS}
# Every tag starts with "<" and holds no other "<", so two matches can never overlap: the tags found in a
# prefix of a text are exactly the tags of the whole text that end inside that prefix.
_TAG_RE = re.compile("|".join(re.escape(tag) for tag in _KINDS))
_LONGEST_TAG = max(len(tag) for tag in _KINDS)

_OUT, _IN_REF, _IN_DET = range(3)

_BRACKET_RE = re.compile(r"[\[\]]")
_INT_RE = re.compile(r"-?[0-9]+")
_FLOAT_RE = re.compile(r"-?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|-?[0-9]+[eE][-+]?[0-9]+")
_SEPARATORS = " \t\r\n\f\v,"

Span = tuple[int, int]
Slicer = Callable[[int, int], str]


@dataclass(frozen=True)
class Box:
    """One box on the original image.

    ``label``: the stripped text of the ref that labels the det (``None`` when the det has no ref).
    ``norm999``: the model's values after clamping to [0, 999] and ordering the corners.
    ``xyxy``: pixels on the original ``W×H`` image, rounded to 2 decimals.
    ``ref_index``: the 0-based group of the answer this box belongs to (see the module docstring).
    ``span``: ``[start, end)`` offsets of the label's ``<|ref|>…<|/ref|>`` (of the det when no ref).
    """

    label: str | None
    norm999: tuple[int, int, int, int]
    xyxy: tuple[float, float, float, float]
    ref_index: int
    span: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "xyxy": list(self.xyxy),
            "norm999": list(self.norm999),
            "ref_index": self.ref_index,
            "span": list(self.span),
        }


@dataclass(frozen=True)
class Rejected:
    """Something in the answer that did not become a box: the raw text (at most 200 chars), why, and where."""

    text: str
    reason: str
    span: tuple[int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "reason": self.reason, "span": list(self.span)}


@dataclass
class GroundingResult:
    boxes: list[Box] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"boxes": [box.to_dict() for box in self.boxes], "rejected": [r.to_dict() for r in self.rejected]}


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
    size = operator.index(value)  # type: ignore[call-overload]
    if size <= 0:
        raise ValueError(f"{name} must be a positive integer number of pixels, got {size}")
    return size


def _short(token: str, limit: int = 20) -> str:
    return token if len(token) <= limit else token[: limit - 1] + "…"


def _read_box(inner: str) -> tuple[int, int, int, int] | str:
    """The four integers between a box's brackets, or the reason they are not a box."""
    if not inner.strip():
        return "empty list"
    values: list[int] = []
    for part in inner.split(","):
        token = part.strip()
        if not token:
            return "empty value in box"
        if _INT_RE.fullmatch(token):
            digits = len(token) - token.startswith("-")
            if digits > _MAX_DIGITS:
                return f"runaway number with {digits} digits (at most {_MAX_DIGITS})"
            values.append(int(token))
        elif _FLOAT_RE.fullmatch(token):
            return f"non-integer value {_short(token)!r}"
        else:
            return f"non-numeric value {_short(token)!r}"
    if len(values) != 4:
        return f"box has {len(values)} numbers, expected 4"
    return values[0], values[1], values[2], values[3]


class _List:
    """A ``[...]`` inside a det body: offsets in the body, whether it holds lists, its depth-2 children."""

    __slots__ = ("children", "closed", "end", "nested", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.end = -1
        self.closed = False
        self.nested = False
        self.children: list[_List] = []


def _read_det_body(body: str) -> tuple[list[tuple[tuple[int, int, int, int], Span]], list[tuple[str, Span]]]:
    """Boxes (values, span in body) and problems (reason, span in body) of a det body, in one pass."""
    boxes: list[tuple[tuple[int, int, int, int], Span]] = []
    problems: list[tuple[str, Span]] = []
    tops: list[_List] = []
    stack: list[_List] = []
    for match in _BRACKET_RE.finditer(body):
        at = match.start()
        if body[at] == "[":
            node = _List(at)
            if not stack:
                tops.append(node)
            else:
                stack[-1].nested = True
                if len(stack) == 1:
                    stack[0].children.append(node)
            stack.append(node)
        elif stack:
            node = stack.pop()
            node.end, node.closed = at + 1, True
        # A "]" with nothing open lies outside every list: the gap check below reports it.
    for node in stack:  # unclosed lists run to the end of the body
        node.end = len(body)
    del stack

    def check_gap(start: int, end: int, what: str) -> None:
        gap = body[start:end]
        stripped = gap.strip(_SEPARATORS)
        if stripped:
            lead = len(gap) - len(gap.lstrip(_SEPARATORS))
            reason = "unexpected ']'" if not stripped.strip("]") else what
            problems.append((reason, (start + lead, start + lead + len(stripped))))

    def candidate(node: _List) -> None:
        if not node.closed:
            problems.append(("box missing ']'", (node.start, node.end)))
            return
        values = _read_box(body[node.start + 1 : node.end - 1])
        if isinstance(values, str):
            problems.append((values, (node.start, node.end)))
        else:
            boxes.append((values, (node.start, node.end)))

    if not tops:
        stripped = body.strip(_SEPARATORS)
        lead = len(body) - len(body.lstrip(_SEPARATORS))
        problems.append(("no [x1, y1, x2, y2] list in <|det|>", (lead, lead + len(stripped))))
        return boxes, problems
    previous = 0
    for top in tops:
        check_gap(previous, top.start, "unexpected text outside the box list")
        previous = top.end
        if not top.nested:
            candidate(top)
            continue
        inside = top.start + 1
        for child in top.children:
            check_gap(inside, child.start, "unexpected text between boxes")
            inside = child.end
            if not child.nested:
                candidate(child)
            elif child.closed:
                problems.append(("nested list deeper than [[x1, y1, x2, y2]]", (child.start, child.end)))
            else:
                problems.append(("box missing ']'", (child.start, child.end)))
        if top.closed:
            check_gap(inside, top.end - 1, "unexpected text between boxes")
        elif top.children[-1].closed:
            check_gap(inside, top.end, "unexpected text between boxes")
            problems.append(("box list missing ']'", (top.start, top.end)))
    check_gap(previous, len(body), "unexpected text outside the box list")
    return boxes, problems


def _pixel(value: int, size: int) -> float:
    return min(float(size), max(0.0, round(value / _MAX_VALUE * size, 2)))


class _Machine:
    """The tag state machine shared by :func:`parse_grounding` and the streaming parser.

    It is fed tags in text order with absolute offsets, plus a ``slicer(start, end)`` that returns the text
    of any range starting at or after the currently open tag.
    """

    def __init__(self, width: int, height: int, max_boxes: int) -> None:
        self.width = _check_size("width", width)
        self.height = _check_size("height", height)
        if isinstance(max_boxes, bool) or not isinstance(max_boxes, int) or max_boxes < 0:
            raise ValueError(f"max_boxes must be a non-negative integer, got {max_boxes!r}")
        self.max_boxes = max_boxes
        self.mode = _OUT
        self.open_start = 0  # offset of the open <|ref|> / <|det|>
        self.open_end = 0
        self.det_label: str | None = None
        self.det_span: Span | None = None  # span of the ref labelling the open det
        self.det_group = 0
        self.waiting: tuple[str, Span, int, str] | None = None  # closed ref without det: label, span, group, raw
        self.groups = 0
        self.scan_pos = 0  # every tag starting before this offset has been read
        self.boxes: list[Box] = []
        self.rejected: list[Rejected] = []
        self.dropped = 0
        self.dropped_text = ""
        self.dropped_span: Span = (0, 0)

    def _reject(self, text: str, reason: str, span: Span) -> None:
        self.rejected.append(Rejected(text[:MAX_TEXT_CHARS], reason, span))

    def _give_up_waiting_ref(self) -> None:
        if self.waiting is not None:
            _, span, _, raw = self.waiting
            self._reject(raw, "ref without boxes", span)
            self.waiting = None

    def tag(self, kind: int, start: int, end: int, slicer: Slicer) -> None:
        self.scan_pos = end
        while True:
            if self.mode == _IN_REF:
                if kind == _REF_CLOSE:
                    raw = slicer(self.open_start, min(end, self.open_start + MAX_TEXT_CHARS))
                    label = slicer(self.open_end, start).strip()
                    self.waiting = (label, (self.open_start, end), self.groups, raw)
                    self.groups += 1
                    self.mode = _OUT
                    return
                text = slicer(self.open_start, min(start, self.open_start + MAX_TEXT_CHARS))
                self._reject(text, "unclosed <|ref|>", (self.open_start, start))
                self.mode = _OUT
                continue  # read the interrupting tag normally
            if self.mode == _IN_DET:
                if kind == _DET_CLOSE:
                    self._close_det(start, end, slicer)
                    self.mode = _OUT
                    return
                text = slicer(self.open_start, min(start, self.open_start + MAX_TEXT_CHARS))
                self._reject(text, "unclosed <|det|>", (self.open_start, start))
                self.mode = _OUT
                continue
            break
        if kind == _REF_OPEN:
            self._give_up_waiting_ref()
            self.mode, self.open_start, self.open_end = _IN_REF, start, end
        elif kind == _DET_OPEN:
            if self.waiting is not None:
                self.det_label, self.det_span, self.det_group, _ = self.waiting
                self.waiting = None
            else:
                self.det_label, self.det_span, self.det_group = None, None, self.groups
                self.groups += 1
            self.mode, self.open_start, self.open_end = _IN_DET, start, end
        elif kind == _REF_CLOSE:
            self._reject(REF_CLOSE, "<|/ref|> without <|ref|>", (start, end))
        elif kind == _DET_CLOSE:
            self._reject(DET_CLOSE, "<|/det|> without <|det|>", (start, end))
        # <|grounding|> and the end-of-sentence marker carry nothing here.

    def _close_det(self, start: int, end: int, slicer: Slicer) -> None:
        base = self.open_end
        body = slicer(base, start)
        if not body.strip():
            self._reject(slicer(self.open_start, end), "empty <|det|>", (self.open_start, end))
            return
        found, problems = _read_det_body(body)
        for reason, (a, b) in problems:
            self._reject(body[a : min(b, a + MAX_TEXT_CHARS)], reason, (base + a, base + b))
        span = self.det_span if self.det_span is not None else (self.open_start, end)
        for values, (a, b) in found:
            if len(self.boxes) >= self.max_boxes:
                if not self.dropped:
                    self.dropped_text = body[a : min(b, a + MAX_TEXT_CHARS)]
                    self.dropped_span = (base + a, base + b)
                self.dropped += 1
                self.dropped_span = (self.dropped_span[0], base + b)
                continue
            self.boxes.append(self._box(values, span))

    def _box(self, values: tuple[int, int, int, int], span: Span) -> Box:
        x1, y1, x2, y2 = (min(max(v, 0), _MAX_VALUE) for v in values)
        if x1 > x2:
            x1, x2 = x2, x1
        if y1 > y2:
            y1, y2 = y2, y1
        w, h = self.width, self.height
        xyxy = (_pixel(x1, w), _pixel(y1, h), _pixel(x2, w), _pixel(y2, h))
        return Box(self.det_label, (x1, y1, x2, y2), xyxy, self.det_group, span)

    def result(self, final: bool, length: int, slicer: Slicer) -> GroundingResult:
        rejected = list(self.rejected)
        if self.dropped:
            reason = f"too many boxes: kept {self.max_boxes}, dropped {self.dropped}"
            rejected.append(Rejected(self.dropped_text, reason, self.dropped_span))
        if final:
            if self.mode != _OUT:
                what = "unclosed <|ref|>" if self.mode == _IN_REF else "unclosed <|det|>"
                text = slicer(self.open_start, min(length, self.open_start + MAX_TEXT_CHARS))
                rejected.append(Rejected(text, what, (self.open_start, length)))
            if self.waiting is not None:
                _, span, _, raw = self.waiting
                rejected.append(Rejected(raw, "ref without boxes", span))
        rejected.sort(key=lambda r: r.span)
        return GroundingResult(list(self.boxes), rejected)


def parse_grounding(
    text: str, width: int, height: int, *, final: bool = True, max_boxes: int = DEFAULT_MAX_BOXES
) -> GroundingResult:
    """Boxes and rejections of a whole answer on a ``width × height`` image.

    With ``final=False`` the text is taken as a prefix of a longer answer: a ref or det still open at the
    end, or a ref still waiting for its det, is pending rather than reported. At most ``max_boxes`` boxes
    are kept; one ``"too many boxes"`` rejection stands for the rest.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    machine = _Machine(width, height, max_boxes)

    def slicer(start: int, end: int) -> str:
        return text[start:end]

    for match in _TAG_RE.finditer(text):
        machine.tag(_KINDS[match.group()], match.start(), match.end(), slicer)
    return machine.result(final, len(text), slicer)


def strip_grounding_tags(text: str) -> str:
    """The prose of an answer: tags and the end-of-sentence marker removed, ref phrases kept, det lists dropped.

    A det list that never closes (an unfinished stream) is dropped up to the next tag or the end.
    """
    pieces: list[str] = []
    position = 0
    in_det = False
    for match in _TAG_RE.finditer(text):
        kind = _KINDS[match.group()]
        if in_det:
            in_det = False
            if kind == _DET_CLOSE:
                position = match.end()
                continue
            position = match.start()  # an interrupted det: drop its body, read the tag normally
        pieces.append(text[position : match.start()])
        position = match.end()
        in_det = kind == _DET_OPEN
    if not in_det:
        pieces.append(text[position:])
    return "".join(pieces)


class StreamingGroundingParser:
    """Feed an answer as it streams; get each box once, as soon as the ``<|/det|>`` closing it arrives.

    The boxes are exactly those of :func:`parse_grounding` on the whole text, however it is chopped. Work
    per delta is proportional to the delta plus, when a tag completes, the text of the group it closes:
    only the tail since the last complete tag group is kept for re-reading.
    """

    def __init__(self, width: int, height: int, *, max_boxes: int = DEFAULT_MAX_BOXES) -> None:
        self._machine = _Machine(width, height, max_boxes)
        self._chunks: list[str] = []
        self._length = 0
        self._tail = ""  # the last few characters, where a tag may have started but not finished
        self._hold: list[str] = []  # text from _hold_offset to the end, joined on demand
        self._hold_offset = 0
        self._emitted = 0

    @property
    def text(self) -> str:
        """Everything fed so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def result(self) -> GroundingResult:
        """Everything read so far, with ``final=False`` semantics (open tags are pending)."""
        return self._machine.result(False, self._length, self._slice)

    def _slice(self, start: int, end: int) -> str:
        if len(self._hold) > 1:
            self._hold = ["".join(self._hold)]
        held = self._hold[0] if self._hold else ""
        offset = self._hold_offset
        if start < offset:
            raise AssertionError("streaming parser dropped text it still needed")  # pragma: no cover
        return held[start - offset : end - offset]

    def feed(self, delta: str) -> list[Box]:
        """Append ``delta``; return the boxes it completed (each box is returned by exactly one call)."""
        if not isinstance(delta, str):
            raise TypeError(f"delta must be a str, got {type(delta).__name__}")
        if not delta:
            return []
        machine = self._machine
        window_offset = self._length - len(self._tail)
        window = self._tail + delta
        self._chunks.append(delta)
        self._hold.append(delta)
        self._length += len(delta)
        found = False
        for match in _TAG_RE.finditer(window, max(machine.scan_pos, window_offset) - window_offset):
            found = True
            start = window_offset + match.start()
            machine.tag(_KINDS[match.group()], start, window_offset + match.end(), self._slice)
        self._tail = window[-(_LONGEST_TAG - 1) :]
        if machine.mode == _OUT:
            self._hold, self._hold_offset = [self._tail], self._length - len(self._tail)
        elif found and machine.open_start > self._hold_offset:
            held = "".join(self._hold)
            self._hold = [held[machine.open_start - self._hold_offset :]]
            self._hold_offset = machine.open_start
        new = machine.boxes[self._emitted :]
        self._emitted = len(machine.boxes)
        return new

    def finish(self) -> GroundingResult:
        """The final result: like :func:`parse_grounding` with ``final=True`` on everything fed."""
        return self._machine.result(True, self._length, self._slice)
