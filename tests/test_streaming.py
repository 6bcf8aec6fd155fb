"""Pacing a reply's text for the page (app/streaming.py): fewer pieces, none held back, Stop still stops."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from app.backends.base import ReplyHandle
from app.streaming import coalesced


def _handle(deltas: Iterator[str]) -> ReplyHandle:
    return ReplyHandle(deltas)


def test_a_flood_is_joined_and_no_text_is_lost():
    words = [f" w{i}" for i in range(5000)]
    pieces = list(coalesced(_handle(iter(words)), interval=60.0, box_interval=60.0))
    # The first goes at once; the rest is held for the interval, then handed on when the reply ends.
    assert len(pieces) == 2 and "".join(pieces) == "".join(words)


def test_text_held_back_is_handed_on_when_the_backend_goes_quiet():
    release = threading.Event()

    def deltas():
        yield "Look:"
        yield " a <|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>"  # held: it comes right after the first
        release.wait(timeout=30)  # the backend stalls until the test has seen the held text
        yield " there."

    pieces = coalesced(_handle(deltas()), interval=60.0, box_interval=0.05)
    assert next(pieces) == "Look:"
    assert next(pieces).endswith("<|/det|>")  # a closed box waits only the box interval
    release.set()
    assert next(pieces) == " there."
    with pytest.raises(StopIteration):
        next(pieces)


def test_closing_early_cancels_the_reply_and_the_reader_closes_the_handle():
    closed = threading.Event()

    def deltas():
        try:
            yield "a"
            while not handle.cancel_event.wait(timeout=30):  # a reply that runs until cancelled
                yield "b"
        finally:
            closed.set()

    handle = _handle(deltas())
    pieces = coalesced(handle, interval=0.0, box_interval=0.0)
    assert next(pieces) == "a"
    pieces.close()
    assert handle.cancel_event.is_set()
    assert closed.wait(timeout=30), "the backend's generator must be closed (its lane released)"


def test_an_error_comes_after_the_text_before_it():
    def deltas():
        yield "first"
        yield " second"
        raise ValueError("bad request")

    pieces = coalesced(_handle(deltas()), interval=60.0, box_interval=60.0)
    assert next(pieces) == "first"
    assert next(pieces) == " second"
    with pytest.raises(ValueError, match="bad request"):
        next(pieces)
