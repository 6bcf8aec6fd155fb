"""The decode-parts benchmark (bench/decode_parts.py) runs and reports every part and phase."""

from __future__ import annotations

import pytest

from bench.decode_parts import NATIVE_PHASES, measure, native_phases, split_step
from model import compute_thread

from .test_native_decode import CAN_RUN


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


def test_the_native_phases_account_for_a_whole_step():
    if not CAN_RUN:  # no AVX512-BF16 or no gcc: the native step is not there to time
        with pytest.raises(RuntimeError):
            compute_thread.run(native_phases, False, 2, 40)
        return
    phases = compute_thread.run(native_phases, False, 3, 40)
    assert list(phases) == list(NATIVE_PHASES)
    assert all(row["ms"] > 0 for row in phases.values())
    # Phases that stream weights or the cache report a read speed; the first norm reads next to nothing.
    assert {name for name, row in phases.items() if row["of_sum"] is None} == {"input norm"}
    assert all(row["of_sum"] > 0 for row in phases.values() if row["of_sum"] is not None)
