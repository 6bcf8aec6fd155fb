"""Streaming, cancellable generation on the compute thread.

``stream_reply`` runs ``model.generate`` on the model's compute thread (``model/compute_thread.py``)
and yields text as it is decoded (``TextIteratorStreamer``). ``cancel()`` sets an event that a
``StoppingCriteria`` checks after every decoding step, so the generation ends within one step of
a cancel — the GPU is free again, not merely the UI.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from . import compute_thread
from .processing import EOS_TEXT, DeepseekVL2Processor, Message


@dataclass
class GenerationSettings:
    """Sampling settings; defaults are the official demo's (temperature 0 means greedy)."""

    max_new_tokens: int = 512
    temperature: float = 0.1
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    min_new_tokens: int = 0
    seed: int | None = None

    def with_max(self, max_new_tokens: int) -> GenerationSettings:
        return replace(self, max_new_tokens=int(max_new_tokens))

    def generate_kwargs(self) -> dict:
        kwargs: dict = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "min_new_tokens": self.min_new_tokens,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


class CancelOnEvent(StoppingCriteria):
    """Stops generation at the first step after ``event`` is set; counts the steps it saw."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.steps += 1
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class ReplyStream:
    """Iterate for text deltas; ``text`` holds the reply so far (eos marker removed)."""

    def __init__(self, streamer: TextIteratorStreamer, cancel_event: threading.Event, criteria: CancelOnEvent):
        self._streamer = streamer
        self._cancel_event = cancel_event
        self.criteria = criteria
        self.text = ""
        self.error: BaseException | None = None
        self.steps_at_cancel: int | None = None
        self.done: Future[None] | None = None  # the generation's job on the compute thread

    def cancel(self) -> None:
        if not self._cancel_event.is_set():
            self.steps_at_cancel = self.criteria.steps
            self._cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel_event.is_set()

    def __iter__(self) -> Iterator[str]:
        pending = ""
        for piece in self._streamer:
            pending += piece
            # Hold back a possible partial eos marker so it never flashes in the UI.
            visible, pending = _split_safe(pending)
            if visible:
                self.text += visible
                yield visible
        tail = pending.replace(EOS_TEXT, "")
        if tail:
            self.text += tail
            yield tail
        self.join()
        if self.error is not None:
            raise self.error

    @property
    def running(self) -> bool:
        return self.done is not None and not self.done.done()

    def join(self, timeout: float | None = None) -> None:
        if self.done is not None:
            futures.wait([self.done], timeout)


def _split_safe(text: str) -> tuple[str, str]:
    text = text.replace(EOS_TEXT, "")
    for keep in range(min(len(EOS_TEXT) - 1, len(text)), 0, -1):
        if EOS_TEXT.startswith(text[-keep:]):
            return text[:-keep], text[-keep:]
    return text, ""


def stream_reply(
    model,
    processor: DeepseekVL2Processor,
    conversation: Sequence[Message],
    settings: GenerationSettings | None = None,
    *,
    system_prompt: str = "",
    cancel_event: threading.Event | None = None,
) -> ReplyStream:
    """Start generating the assistant's reply to ``conversation``; returns the stream at once."""
    settings = settings or GenerationSettings()
    # On the compute thread like the generation itself (model/compute_thread.py says why); bad
    # input still raises here, before anything starts.
    inputs = compute_thread.run(processor, conversation, system_prompt=system_prompt)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=False)
    event = cancel_event or threading.Event()
    criteria = CancelOnEvent(event)
    stream = ReplyStream(streamer, event, criteria)
    special = processor.special

    def run() -> None:
        try:
            if event.is_set():  # cancelled before it started: do not even run the vision tower
                streamer.end()
                return
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            model.generate(
                **inputs,
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([criteria]),
                eos_token_id=special.eos,
                pad_token_id=special.pad,
                use_cache=True,
                **settings.generate_kwargs(),
            )
        except BaseException as exc:  # surfaced to the consumer by ReplyStream.__iter__
            stream.error = exc
            streamer.end()

    stream.done = compute_thread.submit(run)
    return stream


def generate_text(
    model,
    processor: DeepseekVL2Processor,
    conversation: Sequence[Message],
    settings: GenerationSettings | None = None,
    *,
    system_prompt: str = "",
) -> str:
    """Blocking convenience: the whole reply as one string."""
    stream = stream_reply(model, processor, conversation, settings, system_prompt=system_prompt)
    for _ in stream:
        pass
    return stream.text
