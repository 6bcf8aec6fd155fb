"""One long-lived thread for all of the model's work: loading, preprocessing and generation.

PyTorch's CPU kernels run in parallel on OpenMP thread teams, and each Python thread that runs
one gets a team of its own that lives as long as that thread. GNU OpenMP counts the threads of
every team; once they outnumber the cores, an idle team member stops spinning almost at once
and sleeps, so every parallel region has to wake its team from the kernel. A model loaded in one
thread and run in another thus pays that wake-up on each of the thousands of small operations of
a decode step (measured, full-size Tiny on 2 cores: 32-65 ms a token in the loading thread,
111-140 ms in a fresh one; a 64×1280 multiply: 11 µs against 85 µs). Doing all the work on one
thread keeps a single team, whichever threads (the app's workers, a CLI) ask for it.

Two situations need other threads:

* **After a fork** (ZeroGPU runs each GPU call in a forked process) the child has only the thread
  that forked; a compute thread inherited from the parent does not exist there, and jobs queued
  to it would wait for ever. The child starts a compute thread of its own on first use.
* **ZeroGPU** intercepts CUDA in the server process through ``torch`` modes it enters in the main
  thread only, so the model must be loaded there, not on a worker; and in its forked GPU process
  (real CUDA, no interception) the GPU, not OpenMP, does the work. :func:`use_caller_threads`
  makes :func:`run` work in the calling thread (the load) and :func:`submit` start a thread per
  job (a streamed generation), as plain ``transformers`` code would.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")

_jobs: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple, dict] | None] = queue.SimpleQueue()
_thread: threading.Thread | None = None
_start_lock = threading.Lock()
_caller_threads = False
# At exit, how long a running job (a generation nobody cancelled) may hold up leaving; after that
# the thread is left to the interpreter's teardown, as a daemon.
EXIT_WAIT_SECONDS = 5.0


def _complete(future: Future, work: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(work(*args, **kwargs))
    except BaseException as exc:  # handed to whoever waits on the future
        future.set_exception(exc)


def _serve() -> None:
    while (job := _jobs.get()) is not None:
        _complete(*job)
        del job  # nothing of a finished job stays referenced while idle (a result can be a whole model)


def _stop() -> None:
    """End the thread before the interpreter finalizes: left running there, its OpenMP team and
    PyTorch's native threads are torn down under it (seen: "terminate called without an active
    exception", exit status 134, in about one run in four)."""
    if _thread is not None:
        _jobs.put(None)
        _thread.join(EXIT_WAIT_SECONDS)


def _forget_parent_thread() -> None:
    """In a forked child: the parent's thread, queue and lock are copies that nothing serves."""
    global _jobs, _thread, _start_lock
    _jobs, _thread, _start_lock = queue.SimpleQueue(), None, threading.Lock()


os.register_at_fork(after_in_child=_forget_parent_thread)


def use_caller_threads(enabled: bool = True) -> None:
    """Run jobs in the calling thread (:func:`run`) or a thread of their own (:func:`submit`)."""
    global _caller_threads
    _caller_threads = enabled


def on_compute_thread() -> bool:
    return threading.current_thread() is _thread


def submit(work: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
    """Queue ``work`` for the compute thread (started on first use; a daemon, so that a running
    generation never holds up the interpreter's exit). Jobs run one at a time, in order. From
    the compute thread itself ``work`` runs at once: queued, it would wait for its own caller."""
    global _thread
    future: Future[T] = Future()
    if on_compute_thread():
        _complete(future, work, args, kwargs)
        return future
    if _caller_threads:
        threading.Thread(target=_complete, args=(future, work, args, kwargs), name="vl2-job", daemon=True).start()
        return future
    with _start_lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="vl2-compute", daemon=True)
            _thread.start()
            atexit.register(_stop)
    _jobs.put((future, work, args, kwargs))
    return future


def run(work: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``work(*args, **kwargs)`` on the compute thread, waiting for its result."""
    if _caller_threads:
        return work(*args, **kwargs)
    return submit(work, *args, **kwargs).result()


def runs_on_compute_thread(function: Callable[..., T]) -> Callable[..., T]:
    """Decorate ``function`` so that every call runs on the compute thread (see :func:`run`)."""

    @functools.wraps(function)
    def on_the_thread(*args: Any, **kwargs: Any) -> T:
        return run(function, *args, **kwargs)

    return on_the_thread
