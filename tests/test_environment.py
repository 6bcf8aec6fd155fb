"""Every VL2_* switch is read through model/environment.py and documented in docs/configuration.md."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from model import environment

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("app", "model", "bench", "tests") for p in (ROOT / folder).rglob("*.py")] + [
    ROOT / "app.py"
]
NAME = re.compile(r"\bVL2_[A-Z0-9_]+\b(?!\*)")
# Reading a VL2_ variable straight from the process environment, anywhere but model/environment.py.
DIRECT_READ = re.compile(
    r"""(environ\.get\(\s*["']VL2_|getenv\(\s*["']VL2_|["']VL2_\w+["']\s+(not\s+)?in\s+os\.environ|environ\[["']VL2_\w+["']\](?!\s*=))"""
)


def test_every_switch_named_in_the_code_is_documented():
    named = {name for path in SOURCES for name in NAME.findall(path.read_text(encoding="utf-8"))}
    named -= {"VL2_PROFILE", "VL2_NOT_A_SWITCH"}  # a C macro of model/cpu/csrc; the refusal test below
    assert named - {s.name for s in environment.SWITCHES} == set()


def test_only_the_environment_module_reads_the_switches():
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in SOURCES
        if path != ROOT / "model" / "environment.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if DIRECT_READ.search(line)
    ]
    assert offenders == []


def test_the_documented_table_is_the_modules():
    assert environment.table() in (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")


def test_reading_refuses_undocumented_names_and_bad_values(monkeypatch):
    with pytest.raises(KeyError, match="not a documented switch"):
        environment.read("VL2_NOT_A_SWITCH")
    monkeypatch.setenv("VL2_CPU_GEMM", "fp16")
    with pytest.raises(ValueError, match="VL2_CPU_GEMM='fp16': use auto, bf16 or fp32"):
        environment.read_choice("VL2_CPU_GEMM", ("auto", "bf16", "fp32"))
    monkeypatch.setenv("VL2_MAX_TURNS", "many")
    assert environment.read_int("VL2_MAX_TURNS", 200) == 200  # a typo falls back to the default
    monkeypatch.setenv("VL2_VISION_CACHE_MB", "0.5")
    assert environment.read_float("VL2_VISION_CACHE_MB", 256.0) == 0.5
    assert environment.read("VL2_ALLOWED_HOSTS", environ={"VL2_ALLOWED_HOSTS": "box.lan"}) == "box.lan"
