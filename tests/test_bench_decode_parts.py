"""The decode-parts benchmark (bench/decode_parts.py) runs and reports every part."""

from __future__ import annotations

import pytest

from bench.decode_parts import measure, split_step
from model import compute_thread


def test_it_reports_each_parts_read_speed_beside_the_floors():
    result = compute_thread.run(measure, False, 2, 40)
    assert set(result) == {"sum", "lm_head", "attention", "routed experts", "moe stage", "step"}
    assert all(row["gb_per_s"] > 0 and row["of_sum"] > 0 for row in result.values())
    assert result["sum"]["of_sum"] == 1.0


def test_the_split_accounts_for_a_whole_step():
    split = compute_thread.run(split_step, False, 40, 2)
    assert split["step_ms"] > 0
    assert 0 <= split["in_kernels_ms"] <= split["step_ms"]
    assert split["in_kernels_ms"] + split["outside_ms"] == pytest.approx(split["step_ms"])
