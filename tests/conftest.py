"""Shared fixtures: small random-weight checkpoints in the official hub layout, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from model.testing import VARIANTS, make_checkpoint

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# The loader picks the CPU's GEMM dtype by timing this machine (model/cpu/compute.py); tests that
# compare dtypes or outputs need the same choice everywhere. tests/test_cpu_compute.py covers both.
os.environ.setdefault("VL2_CPU_GEMM", "bf16")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    # Two shards, so loading always goes through the index like the real Small/base repos.
    return {
        variant: make_checkpoint(root / variant, variant, shards=2, seed=index)
        for index, variant in enumerate(VARIANTS)
    }


@pytest.fixture(scope="session")
def loaded_fp32(checkpoints):
    """Each variant loaded once in fp32 on CPU through the public loader."""
    from model.loading import load_model

    return {variant: load_model(path, device="cpu", dtype="fp32") for variant, path in checkpoints.items()}
