"""The app under ZeroGPU's rules, on a CPU: ``tests/fake_spaces.py`` forks each ``spaces.GPU`` call.

First the stand-in itself (it must really enforce what ZeroGPU enforces), then the served app with
it installed before the demo is built: the API endpoints and the chat box's send handler, driven
over raw HTTP exactly as a client and the browser drive them. Every wait is bounded, so that a
call that hangs in the forked child fails the test instead of hanging the run.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest

from . import fake_spaces
from .http_client import Answer, call, press_send, send_handler, upload

# Every request is bounded (tests/http_client.py: 120 s; VL2_TEST_REQUEST_SECONDS changes it). Tiny
# random weights answer in seconds; a request that takes that long is stuck (typically a job
# waiting for a thread the fork does not have).


@pytest.fixture(autouse=True)
def _no_child_left():
    """A test that timed out leaves a hung child; killing it frees the caller (and the model lane)."""
    yield
    fake_spaces.reap()


# -- the stand-in ------------------------------------------------------------------------------


def test_child_runs_in_another_process():
    assert fake_spaces.GPU(os.getpid)() != os.getpid()  # bare spaces.GPU(fn)
    assert fake_spaces.GPU(duration=5)(os.getpid)() != os.getpid()


def _is_set(event: threading.Event) -> bool:
    return event.is_set()


def test_unpicklable_argument_fails_like_zerogpu():
    with pytest.raises(pickle.PicklingError, match="pickle"):
        fake_spaces.GPU(_is_set)(threading.Event())


def _event() -> threading.Event:
    return threading.Event()


def test_unpicklable_result_is_a_pickling_error():
    with pytest.raises(gr.Error) as caught:
        fake_spaces.GPU(_event)()
    assert caught.value.message == "PicklingError"


def _raise(exc: Exception) -> None:
    raise exc


def test_other_exceptions_arrive_as_their_class_name():
    with pytest.raises(gr.Error) as caught:
        fake_spaces.GPU(_raise)(ValueError("details stay in the child's log"))
    assert caught.value.message == "ValueError"
    assert caught.value.title == "ZeroGPU worker error"


def test_gradio_errors_arrive_as_themselves():
    with pytest.raises(gr.Error) as caught:
        fake_spaces.GPU(_raise)(gr.Error("msg"))
    assert caught.value.message == "msg"


def _die() -> None:
    os._exit(3)


def test_dead_child_aborts_the_task():
    with pytest.raises(gr.Error) as caught:
        fake_spaces.GPU(_die)()
    assert caught.value.message == "GPU task aborted"


def _two_items(fifo: str) -> Iterator[tuple[int, str]]:
    yield os.getpid(), "first"
    # Blocks until the parent opens the FIFO, which it does only once it holds the first item:
    # a stand-in that collected the items before sending would never get here.
    with open(fifo) as reader:
        reader.read()
    yield os.getpid(), "second"


def test_generator_items_arrive_one_by_one(tmp_path):
    fifo = str(tmp_path / "go")
    os.mkfifo(fifo)
    items: queue.Queue[Any] = queue.Queue()

    def consume() -> None:
        try:
            for item in fake_spaces.GPU(_two_items)(fifo):
                items.put(item)
        except Exception as exc:
            items.put(exc)
        items.put(None)

    threading.Thread(target=consume, daemon=True).start()
    child_pid, first = items.get(timeout=30)
    assert first == "first" and child_pid != os.getpid()
    with open(fifo, "w") as writer:
        writer.write("go")
    assert items.get(timeout=30) == (child_pid, "second")
    assert items.get(timeout=30) is None


def _count_until_closed(marker: str) -> Iterator[int]:
    number = 0
    try:
        while True:
            number += 1
            yield number
    finally:
        Path(marker).write_text(str(number))  # ran in the child: only gen.close() gets here


def test_closing_the_generator_stops_the_child(tmp_path):
    marker = tmp_path / "closed"
    stream = fake_spaces.GPU(_count_until_closed)(str(marker))
    assert next(stream) == 1
    (child,) = fake_spaces.running()
    stream.close()
    assert child.done.wait(30), "the child must finish on its own once told to stop"
    assert child.process.exitcode == 0
    assert int(marker.read_text()) >= 1


def _inner() -> int:
    return os.getpid()


def _outer() -> tuple[int, int]:
    return os.getpid(), fake_spaces.GPU(_inner)()


def test_nested_calls_run_inline_in_the_child():
    outer, inner = fake_spaces.GPU(_outer)()
    assert outer == inner != os.getpid()


# -- the served app ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zerogpu_app(checkpoints, tmp_path_factory) -> Iterator[str]:
    """The real demo on a tiny random-weight checkpoint, ZeroGPU mode on before anything is built."""
    tmp_path = tmp_path_factory.mktemp("zerogpu")
    with pytest.MonkeyPatch.context() as monkeypatch:
        fake_spaces.install(monkeypatch)
        from app import zerogpu
        from model import compute_thread

        zerogpu.prepare()  # what app/launch.py:main() calls first: imports spaces, caller threads
        try:
            # Imported here, not at the top: the stand-in's tests above do not depend on the app.
            from app.backends.local import LocalBackend
            from app.ui import build_demo, launch_options
            from model.loading import load_model

            from .app_support import free_port

            backend = LocalBackend(load_model(checkpoints["tiny"], device="cpu", dtype="fp32"))
            demo = build_demo(backend, image_dir=tmp_path / "images")
            demo.queue(max_size=16)
            _, url, _ = demo.launch(
                prevent_thread_lock=True,
                server_name="127.0.0.1",
                server_port=free_port(),
                quiet=True,
                **launch_options(),
            )
            try:
                yield url.rstrip("/")
            finally:
                fake_spaces.reap()
                demo.close()
        finally:
            compute_thread.use_caller_threads(False)


@pytest.fixture
def square(zerogpu_app, tmp_path) -> dict:
    """A 320×240 grey PNG uploaded to the app, as the FileData a request refers to."""
    from .app_support import solid_image

    return upload(zerogpu_app, solid_image(tmp_path / "square.png", (320, 240)))


def _answered(answer: Answer) -> Any:
    assert answer.kind == "complete", f"answered with {answer.kind}: {answer.value}"
    return answer.value


@contextlib.contextmanager
def _forked_call(name: str) -> Iterator[None]:
    """Time a request (the timings go into the report) and check it really went to a forked child."""
    start, forks = time.monotonic(), fake_spaces.forks
    try:
        yield
    finally:
        print(f"\n{name}: {time.monotonic() - start:.1f} s")
    assert fake_spaces.forks > forks, f"{name} did not go through spaces.GPU"


def test_ground_answers_under_zerogpu(zerogpu_app, square):
    with _forked_call("/ground"):
        result = _answered(call(zerogpu_app, "ground", [square, "the grey square", 8]))
    assert set(result) == {"boxes", "raw_text", "document"}
    assert isinstance(result["boxes"], list) and isinstance(result["raw_text"], str)
    assert result["document"]["turns"][0]["boxes"] == result["boxes"]


def test_identify_answers_under_zerogpu(zerogpu_app, square):
    with _forked_call("/identify"):
        result = _answered(call(zerogpu_app, "identify", [square, 160, 120]))
    assert set(result) == {"label", "box", "contains_point", "notice", "raw_text"}
    assert isinstance(result["label"], str) and result["label"]
    assert set(result["box"]) == {"xyxy", "norm999"} and len(result["box"]["xyxy"]) == 4


def test_chat_streams_under_zerogpu(zerogpu_app, square):
    with _forked_call("/chat"):
        answer = call(zerogpu_app, "chat", ["What is this?", [square], [], "Ask", 8, 0.0])
    final, partials = _answered(answer), answer.partials
    assert set(final) == {"text", "raw", "boxes", "rejected", "done", "error"}
    assert final["done"] is True and final["error"] is None
    assert partials, "the reply must stream"
    assert all(set(p) == set(final) for p in partials)


def _roles(chat: list[dict]) -> list[str]:
    """Speakers in order, one per turn (an image and its text are separate messages of one turn)."""
    roles = [m["role"] for m in chat]
    return [role for i, role in enumerate(roles) if i == 0 or role != roles[i - 1]]


def test_send_handler_answers_under_zerogpu(zerogpu_app, square):
    """Two turns in one browser session: the conversation state goes to the child and back, twice."""
    session_hash = uuid.uuid4().hex[:11]
    config = httpx.get(f"{zerogpu_app}/config", timeout=30).json()
    (handler,) = (d for d in config["dependencies"] if d["id"] == send_handler(config)[0])
    assert handler["api_visibility"] == "private" and handler["types"]["generator"]
    for turn, message in enumerate(({"text": "What is this?", "files": [square]}, {"text": "And now?", "files": []})):
        with _forked_call(f"send handler, turn {turn + 1}"):
            messages = press_send(zerogpu_app, session_hash, message)
        final = messages[-1]
        assert final["success"], f"the send handler failed: {final.get('output')}"
        warnings = [m for m in messages if m["msg"] == "log" and m.get("level") == "warning"]
        assert not warnings, f"the send handler warned: {warnings}"
        assert any(m["msg"] == "process_generating" for m in messages), "the reply must stream"
        chat = final["output"]["data"][0]
        assert _roles(chat) == ["user", "assistant"] * (turn + 1), chat
