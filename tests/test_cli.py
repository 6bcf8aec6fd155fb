"""``python -m model …``: once as a user's script would call it (a process of its own), the rest
through ``model.cli.main`` in this process (the same parser and commands, without paying for a
fresh interpreter, torch import and kernel compilation each time)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from model.cli import main

from .test_model_forward import _gradient_image

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    # Compiled decode kernels are tested elsewhere; compiling them again here would take most of the run.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "VL2_CPU_KERNELS": "eager"}
    return subprocess.run(
        [sys.executable, "-m", "model", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys, monkeypatch):
    """``python -m model ARGS`` run in this process: its exit code and what it printed."""

    def run(*args: str, stdin: str | None = None) -> Ran:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


@pytest.mark.parametrize(
    ("size", "images", "grid", "tokens"),
    [
        ("640x480", 1, [2, 2], 1023),
        ("1920x1080", 1, [4, 2], 1807),
        ("100x2000", 2, [1, 6], 1471),
        ("640x480", 3, [1, 1], 421),
    ],
)
def test_plan(cli, size, images, grid, tokens):
    result = cli("plan", "--size", size, "--images", str(images))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"grid": grid, "tiles": 1 + grid[0] * grid[1], "image_tokens": tokens}


def test_parse_reads_stdin(cli):
    text = (
        "<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 999], [100, 200, 300, 400]]<|/det|>"
        "<|ref|>x<|/ref|><|det|>[[1,2,3]]<|/det|>"
    )
    result = cli("parse", "--size", "640x480", stdin=text)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert [b["label"] for b in document["boxes"]] == ["cat", "cat"]
    assert document["boxes"][0]["xyxy"] == [0.0, 0.0, 640.0, 480.0]
    assert document["boxes"][1]["norm999"] == [100, 200, 300, 400]
    assert len(document["rejected"]) == 1


def test_bad_size_is_a_usage_error(cli):
    result = cli("plan", "--size", "wide")
    assert result.returncode == 2 and "640x480" in result.stderr


def test_ground_and_chat_on_a_generated_checkpoint(cli, checkpoints, tmp_path):
    image_path = tmp_path / "photo.png"
    _gradient_image(320, 200).save(image_path)
    model = str(checkpoints["tiny"])
    result = run_cli(
        "ground",
        "--model",
        model,
        "--image",
        str(image_path),
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "8",
        "the red car",
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"boxes", "rejected", "text"} and isinstance(document["text"], str)
    chat = cli(
        "chat",
        "--model",
        model,
        "--image",
        str(image_path),
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "8",
        "Hi?",
    )
    assert chat.returncode == 0, chat.stderr


def test_missing_model_is_explained(cli):
    result = cli("ground", "--model", "/nonexistent/ckpt", "--image", "x.png", "thing")
    assert result.returncode == 2
    assert "error:" in result.stderr


def test_inspect_shows_that_the_experts_are_four_bit(cli, checkpoints):
    result = cli("inspect", "--model", str(checkpoints["tiny"]), "--quantization", "4bit", "--dtype", "bf16", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    kinds = summary["by_kind"]
    assert set(kinds["routed experts"]["dtypes"]) == {"uint8"}
    assert set(kinds["shared experts"]["dtypes"]) == {"uint8"}
    assert set(kinds["vision"]["dtypes"]) == {"bfloat16"} and kinds["vision"]["devices"] == ["cpu"]
    assert "lm_head" in kinds and "embeddings" in kinds and "projector" in kinds
    assert summary["total_bytes"] == sum(summary["by_dtype"].values())
    table = cli("inspect", "--model", str(checkpoints["tiny"]), "--dtype", "fp32")
    assert "routed experts" in table.stdout and "float32" in table.stdout


def test_inspect_plans_a_gpu_budget_without_a_gpu(cli, checkpoints):
    result = cli(
        "inspect", "--model", str(checkpoints["small"]), "--quantization", "4bit", "--dtype", "bf16",
        "--gpu-memory", "2GiB", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["placement"].startswith("plan only (no CUDA device here): GPU budget 2.0 GiB")
    assert "everything on the GPU" in summary["placement"]  # the small test checkpoint fits
    refused = cli("inspect", "--model", str(checkpoints["small"]), "--gpu-memory", "1GiB")
    assert refused.returncode == 2 and "cannot hold the parts that must stay on the GPU" in refused.stderr
    no_card = cli("inspect", "--model", str(checkpoints["small"]), "--gpu-memory", "auto")
    assert no_card.returncode == 2 and "give a size instead, e.g. --gpu-memory 8GiB" in no_card.stderr
