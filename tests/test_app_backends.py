"""Backends behind the UI seam: background loading with visible progress and readable failures."""

from __future__ import annotations

import threading

import pytest

from app.backends.base import BackendError, BackendInfo
from app.backends.loading import BackgroundLoadedBackend
from app.backends.scripted import ScriptedBackend
from app.ui import header_markdown
from model.generation import GenerationSettings
from model.loading import ModelLoadError
from model.processing import Message

PLACEHOLDER = BackendInfo("deepseek-ai/deepseek-vl2-tiny", "loading…", "auto")


def test_progress_is_visible_until_the_model_is_ready():
    release = threading.Event()
    reported = threading.Event()

    def loader(progress):
        progress("downloading: 1.20/6.74 GB")
        reported.set()
        release.wait(timeout=30)
        return ScriptedBackend("ready now", info=BackendInfo("tiny", "bf16", "cuda"))

    backend = BackgroundLoadedBackend(loader, PLACEHOLDER)
    assert reported.wait(timeout=30)
    assert "downloading: 1.20/6.74 GB" in backend.status
    assert "loading…" in header_markdown(backend) and "downloading" in header_markdown(backend)
    release.set()
    assert backend.wait(timeout=30) and backend.ready and backend.status == "ready"
    assert backend.info.precision == "bf16"
    reply = "".join(backend.stream([Message("user", "hi")], GenerationSettings()))
    assert reply == "ready now"


def test_a_failed_load_is_reported_on_screen_and_on_every_request():
    def loader(progress):
        raise ModelLoadError("cannot reach the Hugging Face hub ... pass --model DIR")

    backend = BackgroundLoadedBackend(loader, PLACEHOLDER)
    assert backend.wait(timeout=30)
    assert "failed" in backend.status and "--model DIR" in backend.status
    assert "--model DIR" in header_markdown(backend)
    with pytest.raises(BackendError, match="--model DIR"):
        backend.stream([Message("user", "hi")], GenerationSettings())


def test_the_app_says_why_when_the_model_is_unavailable(tmp_path):
    from app.controller import Controller
    from app.modes import Mode
    from app.session import Session

    def loader(progress):
        raise ModelLoadError("model not found: pass --model DIR")

    backend = BackgroundLoadedBackend(loader, PLACEHOLDER)
    controller, session = Controller(backend, image_dir=tmp_path), Session()
    turn = controller.begin(session, "hello", Mode.ASK)
    updates = list(controller.run_turn(session, turn, GenerationSettings()))
    assert updates[-1].done and "--model DIR" in turn.error
    assert session.turns == [turn]  # the question stays in the conversation


def test_the_header_tooltip_says_where_the_parts_are_and_how_the_cpu_computes():
    from app.backends.local import memory_summary
    from model.loading import LoadInfo

    info = LoadInfo(
        model_id="deepseek-ai/deepseek-vl2-small", path="/x", variant="small", device="cuda:0", dtype="torch.bfloat16",
        quantization="4bit", bytes_by_dtype={"uint8": 7 * 10**9, "bfloat16": 10**9},
        parts={"routed experts": {"bytes": 7 * 10**9, "dtypes": {"uint8": 7 * 10**9}, "devices": ["cpu", "cuda:0"]}},
        placement="GPU budget 8.0 GiB: …; routed experts of 9/26 MoE layers (2.41 GiB, layers 1–9) on the CPU",
    )  # fmt: skip
    text = memory_summary(info)
    assert "weights 8.00 GB" in text
    assert "routed experts: 7.00 GB uint8 on cpu, cuda:0" in text
    assert text.endswith("layers 1–9) on the CPU")
