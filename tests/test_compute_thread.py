"""All of the model's work on one thread (model/compute_thread.py), whoever asks for it."""

from __future__ import annotations

import json
import multiprocessing
import os
import threading

import pytest

from model import compute_thread
from model.generation import GenerationSettings, generate_text, stream_reply
from model.loading import load_model
from model.processing import DeepseekVL2Processor, Message

from .test_model_forward import _gradient_image


def test_a_job_runs_on_the_compute_thread_and_hands_back_its_result_or_error():
    assert compute_thread.run(lambda: threading.current_thread().name) == "vl2-compute"
    assert not compute_thread.on_compute_thread()

    def fails():
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        compute_thread.run(fails)


def test_a_job_that_asks_for_the_compute_thread_runs_at_once_instead_of_waiting_for_itself():
    nested = compute_thread.run(lambda: compute_thread.run(lambda: compute_thread.on_compute_thread()))
    assert nested is True


def test_loading_preprocessing_and_generation_all_run_on_the_compute_thread(checkpoints, monkeypatch):
    threads: set[str] = set()

    def note_thread(*_):
        threads.add(threading.current_thread().name)

    preprocess = DeepseekVL2Processor.__call__

    def noting_preprocess(self, *args, **kwargs):
        note_thread()
        return preprocess(self, *args, **kwargs)

    monkeypatch.setattr(DeepseekVL2Processor, "__call__", noting_preprocess)
    loaded = load_model(checkpoints["tiny"], device="cpu", dtype="fp32", progress=note_thread)
    loaded.model.language.register_forward_pre_hook(note_thread)
    loaded.model.vision.register_forward_pre_hook(note_thread)
    conversation = [Message("user", "What is this?", [_gradient_image(96, 64)])]
    settings = GenerationSettings(temperature=0, max_new_tokens=3, min_new_tokens=3)
    pieces = list(stream_reply(loaded.model, loaded.processor, conversation, settings))
    assert threads == {"vl2-compute"}
    # The blocking form gives the same text from any thread, the compute thread's own included.
    text = generate_text(loaded.model, loaded.processor, conversation, settings)
    on_the_thread = compute_thread.run(generate_text, loaded.model, loaded.processor, conversation, settings)
    assert "".join(pieces) == text == on_the_thread


def test_the_thread_benchmark_times_both_ways_per_step(capsys):
    from bench.threads import main

    assert main(["--rounds", "1", "--tokens", "6"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["compute_thread_ms"]) == len(report["fresh_thread_ms"]) == 1
    assert report["compute_thread_ms"][0] > 0 and report["fresh_over_compute_thread"] > 0


def _answer_in_a_fork(results) -> None:
    results.put((compute_thread.run(lambda: threading.current_thread().name), os.getpid()))


def test_a_forked_child_gets_a_compute_thread_of_its_own():
    """ZeroGPU runs each GPU call in a fork, where the parent's compute thread does not exist."""
    assert compute_thread.run(lambda: 1) == 1  # the parent's thread is running
    fork = multiprocessing.get_context("fork")
    results = fork.SimpleQueue()
    child = fork.Process(target=_answer_in_a_fork, args=(results,), daemon=True)
    child.start()
    child.join(60)
    assert child.exitcode == 0, "the job queued in the child never ran"
    name, pid = results.get()
    assert name == "vl2-compute" and pid != os.getpid()
