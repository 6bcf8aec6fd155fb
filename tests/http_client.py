"""A stranger's client: raw HTTP to a served app, the way curl or another language would call it.

Uploads go through ``/gradio_api/upload``; typed endpoints through ``/gradio_api/call/<name>`` and
their event stream; the page's own handlers through ``/gradio_api/queue/join`` (as the browser
sends them; Gradio runs "private" handlers for anyone who names their ``fn_index``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from model.environment import read_float

REQUEST_SECONDS = read_float("VL2_TEST_REQUEST_SECONDS", 120.0)  # one whole request
READ_SECONDS = 30.0  # one read on an event stream; Gradio's heartbeats come every 15 s
FILE_DATA = {"_type": "gradio.FileData"}


def upload(url: str, path: Path) -> dict:
    """Upload ``path``; returns the FileData dict a request then refers to."""
    with path.open("rb") as file:
        response = httpx.post(f"{url}/gradio_api/upload", files={"files": (path.name, file)}, timeout=READ_SECONDS)
    response.raise_for_status()
    (uploaded,) = response.json()
    return {"path": uploaded, "orig_name": path.name, "meta": FILE_DATA}


def events(url: str, deadline: float, **params: Any) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a server-sent event stream, until the deadline."""
    with httpx.stream("GET", url, params=params, timeout=READ_SECONDS) as response:
        response.raise_for_status()
        event, data = "message", []
        for line in response.iter_lines():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no final event within {REQUEST_SECONDS:.0f} s")
            if line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").strip())
            elif not line and data:
                yield event, "\n".join(data)
                event, data = "message", []
    raise AssertionError("the event stream ended without a final event")


@dataclass
class Answer:
    kind: str  # "complete", "error", or "http" (refused before the queue: ``value`` is the status)
    value: Any = None  # the result (first output), the error message, or the HTTP status
    partials: list = field(default_factory=list)  # each streamed update's first output


def call(url: str, name: str, data: list, *, headers: dict | None = None) -> Answer:
    """``POST /gradio_api/call/<name>`` with hand-written JSON, then read its event stream."""
    deadline = time.monotonic() + REQUEST_SECONDS
    posted = httpx.post(f"{url}/gradio_api/call/{name}", json={"data": data}, headers=headers, timeout=READ_SECONDS)
    if posted.status_code != 200:
        return Answer("http", posted.status_code)
    event_id = posted.json()["event_id"]
    partials = []
    for event, payload in events(f"{url}/gradio_api/call/{name}/{event_id}", deadline):
        if event == "generating":
            partials.append(json.loads(payload)[0])
        elif event == "complete":
            return Answer("complete", json.loads(payload)[0], partials)
        elif event == "error":
            return Answer("error", (json.loads(payload) or {}).get("error"), partials)
    raise AssertionError("unreachable")


def send_handler(config: dict) -> tuple[int, int]:
    """fn_index of the chat box's send handler, and the box's id.

    Enter in the prompt box first swaps Send for Stop, then (chained) runs the handler that reads
    the box: the one that follows a listener on the box's submit and takes the box as input.
    """
    (textbox,) = (c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "prompt")
    submits = {d["id"] for d in config["dependencies"] if [textbox, "submit"] in d["targets"]}
    (dependency,) = (d for d in config["dependencies"] if d.get("trigger_after") in submits and textbox in d["inputs"])
    return dependency["id"], textbox


def press_send(url: str, session_hash: str, message: dict, *, max_new_tokens: int = 16) -> list[dict]:
    """Press Enter in the chat box: queue/join with the handler's fn_index, then read queue/data.

    Returns every message of that event, the last one ``process_completed``.
    """
    return list(send_messages(url, session_hash, message, max_new_tokens=max_new_tokens))


def send_messages(url: str, session_hash: str, message: dict, *, max_new_tokens: int = 16) -> Iterator[dict]:
    """:func:`press_send`, message by message as they arrive."""
    config = httpx.get(f"{url}/config", timeout=READ_SECONDS).json()
    fn_index, textbox = send_handler(config)
    # Inputs: textbox, mode, temperature, top_p, repetition penalty, max new tokens, state (the
    # browser sends null for a gr.State; the server keeps its value per session hash).
    body = {
        "data": [message, "Ask", 0.0, 0.9, 1.0, max_new_tokens, None],
        "event_data": None,
        "fn_index": fn_index,
        "trigger_id": textbox,
        "session_hash": session_hash,
    }
    deadline = time.monotonic() + REQUEST_SECONDS
    joined = httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=READ_SECONDS)
    joined.raise_for_status()
    event_id = joined.json()["event_id"]
    for _event, payload in events(f"{url}/gradio_api/queue/data", deadline, session_hash=session_hash):
        received = json.loads(payload)
        if received.get("event_id") not in (None, event_id):
            continue
        yield received
        if received["msg"] == "process_completed":
            return
    raise AssertionError("unreachable")
