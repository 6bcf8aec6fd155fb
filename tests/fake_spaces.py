"""A CPU stand-in for Hugging Face's ``spaces`` package on ZeroGPU: ``spaces.GPU`` runs calls in a fork.

On a ZeroGPU Space (``spaces`` 0.51) a decorated call does not run in the server process: it runs
in a process forked with multiprocessing's "fork" context, and everything crosses over pickled. An
app that works in-process can fail there in ways no other test sees — an argument holding a lock,
a result holding a thread's event, a job handed to a thread that the child does not have. This
module reproduces those rules on a CPU so that the app's tests can catch them:

* arguments and results really go through fork-context ``SimpleQueue``\\s (pickled both ways);
* generator functions stream item by item, and closing the caller's generator stops the child
  after its next item (the stop flag ZeroGPU sets on ``GeneratorExit``);
* a ``gr.Error`` raised in the child is re-raised as itself; any other exception reaches the
  caller as ``gr.Error(<class name>, title="ZeroGPU worker error")``, an unpicklable result as
  ``gr.Error("PicklingError")``, a child that dies as ``gr.Error("GPU task aborted")``;
* in the child the call runs on a fresh thread, and nested ``spaces.GPU`` calls run inline;
* ``gr.Info``/``gr.Warning`` raised in the child are shown by the parent's queue, as ZeroGPU does.

The real package keeps one forked worker and reuses it; this one forks per call, which is
stricter: nothing the child changes survives to the next call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import multiprocessing
import pickle
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr
import gradio.queueing
from gradio.context import LocalContext

_fork = multiprocessing.get_context("fork")
_in_child = False  # True in a forked child: nested GPU calls there run inline, as on ZeroGPU
_live: set[_Child] = set()  # children still running (see reap)
_live_lock = threading.Lock()
forks = 0  # calls that went to a child, so that a test can tell the app really used spaces.GPU

ABORTED = "GPU task aborted"
WORKER_ERROR = "ZeroGPU worker error"


def install(monkeypatch: Any) -> None:
    """Make ``import spaces`` give this module and turn ZeroGPU mode on (undone with ``monkeypatch``)."""
    monkeypatch.setenv("SPACES_ZERO_GPU", "1")
    monkeypatch.setitem(sys.modules, "spaces", sys.modules[__name__])


def reap(timeout: float = 5.0) -> int:
    """Kill the children still running (a test that timed out on a hung call); returns how many.

    Each kill ends its caller's wait with "GPU task aborted", so server threads are not left blocked.
    """
    children = running()
    for child in children:
        child.process.kill()
        child.done.wait(timeout)
    return len(children)


def running() -> list[_Child]:
    """The children whose process has not ended yet."""
    with _live_lock:
        return list(_live)


def GPU(task: Callable | None = None, *, duration: Any = None, size: str | None = None) -> Any:
    """``spaces.GPU(fn)`` or ``spaces.GPU(duration=N)(fn)``; ``duration`` and ``size`` only matter to the scheduler."""
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    if inspect.isgeneratorfunction(task):
        return _streaming(task)
    return _single(task)


def _single(task: Callable) -> Callable:
    @functools.wraps(task)  # Gradio reads the signature (gr.Request parameters, API types) through this
    def call(*args: Any, **kwargs: Any) -> Any:
        if _in_child:
            return task(*args, **kwargs)
        for value in _Child(task, args, kwargs).messages():
            return value
        raise gr.Error(ABORTED, title=WORKER_ERROR)  # ended without a result (cannot happen for a return)

    return call


def _streaming(task: Callable) -> Callable:
    @functools.wraps(task)  # still a generator function, so Gradio streams it
    def call(*args: Any, **kwargs: Any) -> Iterator[Any]:
        if _in_child:
            yield from task(*args, **kwargs)
            return
        child = _Child(task, args, kwargs)
        for item in child.messages():
            try:
                yield item
            except GeneratorExit:
                # The user stopped (or left): the child stops after its next item. Its remaining
                # output is read and dropped, so that it never blocks on a full pipe.
                child.stop.set()
                threading.Thread(target=child.drain, daemon=True).start()
                raise

    return call


def _started(child: _Child) -> None:
    global forks
    with _live_lock:
        _live.add(child)
        forks += 1


def _put(queue: Any, message: Any) -> None:
    """``queue.put``, with any failure to pickle reported as ``PicklingError`` (as ``spaces`` does)."""
    try:
        queue.put(message)
    except pickle.PicklingError:
        raise
    except Exception as exc:  # e.g. TypeError: cannot pickle '_thread.lock' object
        if "pickle" not in str(exc):
            raise
        raise pickle.PicklingError(str(exc)) from exc


class _Child:
    """One forked process running one call; the parent reads its messages from ``results``.

    Messages: ``("item", value)``, ``("log", kwargs)``, ``("error", (gr_error | None, class name))``,
    ``("end", None)``; ``None`` (put by the sentinel thread) once the process is gone.
    """

    def __init__(self, task: Callable, args: tuple, kwargs: dict) -> None:
        self.results = _fork.SimpleQueue()
        self.stop = _fork.Event()
        self.done = threading.Event()  # set once the process is gone and its exit code known
        calls = _fork.SimpleQueue()
        # Where gr.Info/gr.Warning from the child are shown: this event's queue, found now, in the
        # request's context (a generator's later items may be read on other threads).
        blocks = LocalContext.blocks.get(None)
        self.gradio_queue = getattr(blocks, "_queue", None)
        # Only the queues and the task cross the fork as memory; the arguments go through ``calls``.
        self.process = _fork.Process(target=_child_main, args=(task, calls, self.results, self.stop), daemon=True)
        self.process.start()
        _started(self)
        threading.Thread(target=self._sentinel, daemon=True).start()
        try:
            _put(calls, (args, kwargs))
        except pickle.PicklingError:
            self.process.kill()
            raise

    def _sentinel(self) -> None:
        """After the child exits, end the parent's wait: ``None`` follows everything the child wrote.

        The only thread that joins the process (two joining at once can leave one without the exit code).
        """
        self.process.join()
        with _live_lock:
            _live.discard(self)
        self.done.set()
        # A child killed mid-write would leave the queue's write lock taken (released at most once).
        with contextlib.suppress(ValueError, AttributeError):
            self.results._wlock.release()
        self.results.put(None)

    def messages(self) -> Iterator[Any]:
        """The values the child returns or yields, in order; raises what the child raised, mapped."""
        while (message := self.results.get()) is not None:
            kind, payload = message
            if kind == "item":
                yield payload
            elif kind == "log" and self.gradio_queue is not None:
                self.gradio_queue.log_message(**payload)
            elif kind == "error":
                gradio_error, class_name = payload
                raise gradio_error or gr.Error(class_name, title=WORKER_ERROR, print_exception=False)
            elif kind == "end":
                return
        raise gr.Error(ABORTED, title=WORKER_ERROR, print_exception=False)

    def drain(self) -> None:
        while (message := self.results.get()) is not None and message[0] != "end":
            pass


def _child_main(task: Callable, calls: Any, results: Any, stop: Any) -> None:
    global _in_child
    _in_child = True

    # gr.Info/gr.Warning end in the queue's log_message; here that queue is a copy nobody serves.
    def log_message(_queue: Any, **kwargs: Any) -> None:
        _put(results, ("log", kwargs))

    gradio.queueing.Queue.log_message = log_message  # only in this child process
    args, kwargs = calls.get()
    # A fresh thread, as on ZeroGPU; it keeps the request's context (event id, blocks) the fork copied.
    worker = threading.Thread(target=contextvars.copy_context().run, args=(_run, task, args, kwargs, results, stop))
    worker.start()
    worker.join()


def _run(task: Callable, args: tuple, kwargs: dict, results: Any, stop: Any) -> None:
    try:
        if inspect.isgeneratorfunction(task):
            generator = task(*args, **kwargs)
            for item in generator:
                if stop.is_set():
                    generator.close()
                    break
                _put(results, ("item", item))
        else:
            _put(results, ("item", task(*args, **kwargs)))
    except Exception as exc:
        traceback.print_exc()  # the child's traceback, as ZeroGPU prints it
        error = exc if isinstance(exc, gr.Error) else None
        try:
            _put(results, ("error", (error, type(exc).__name__)))
        except pickle.PicklingError:  # a gr.Error carrying something unpicklable
            _put(results, ("error", (None, type(exc).__name__)))
    _put(results, ("end", None))
