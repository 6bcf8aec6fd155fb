"""Faults in the real runtime path: out-of-memory mid-stream, then the next request still works."""

from __future__ import annotations

import torch

from app.backends.local import OOM_ADVICE, LocalBackend
from app.controller import Controller
from app.modes import Mode
from app.session import Session
from model.generation import GenerationSettings

from .app_support import solid_image


def test_out_of_memory_mid_stream_is_explained_and_the_next_request_works(loaded_fp32, tmp_path, monkeypatch):
    loaded = loaded_fp32["tiny"]
    backend = LocalBackend(loaded)
    controller, session = Controller(backend, image_dir=tmp_path), Session()
    tokenizer = loaded.processor.tokenizer
    partial = tokenizer.encode("The picture shows", add_special_tokens=False)

    def generate_then_run_out_of_memory(*args, streamer=None, **kwargs):
        streamer.put(torch.tensor([[0, 1, 2]]))  # the prompt (skipped by the streamer)
        for token in partial:
            streamer.put(torch.tensor([token]))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

    monkeypatch.setattr(loaded.model, "generate", generate_then_run_out_of_memory)
    turn, _ = controller.accept(session, "What is this?", [solid_image(tmp_path / "a.png", (64, 64))], Mode.ASK)
    updates = list(controller.run_turn(session, turn, GenerationSettings(max_new_tokens=8)))
    assert updates[-1].done and turn.error == OOM_ADVICE
    assert "4bit" in turn.error and "fewer or smaller images" in turn.error
    assert backend.lane.acquire(blocking=False), "the model lane must be free again"
    backend.lane.release()
    monkeypatch.undo()
    retry, _ = controller.accept(session, "And now?", [], Mode.ASK)
    updates = list(controller.run_turn(session, retry, GenerationSettings(max_new_tokens=4, temperature=0)))
    assert updates[-1].done and retry.error is None
