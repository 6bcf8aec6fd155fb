"""The prepared GPU check (bench/gpu.py) on the CPU: its steps must work before a GPU is lent."""

from __future__ import annotations

import pytest
import torch

from bench.gpu import GRAPH_CONFIGS, STEPS, answer, budget_offloading, main, parse_graph_config
from model.configuration import load_official_config
from model.loading import plan_before_loading


def test_the_budget_for_the_hybrid_smoke_offloads_exactly_the_groups_asked_for(checkpoints):
    config = load_official_config(checkpoints["small"])
    for groups in (1, 2):
        budget = budget_offloading(checkpoints["small"], groups, "nf4")
        plan = plan_before_loading(config, budget, torch.bfloat16, "4bit")
        assert len(plan.cpu_layers) == groups, plan.describe()


def test_the_answer_step_loads_answers_a_grounding_query_and_reports_its_numbers():
    result = answer("tiny", "bf16", None, 4, repeats=1, full_size=False, device="cpu")
    assert result["config"] == "tiny (reduced)/bf16 on cpu"
    assert result["load_s"] > 0 and result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0
    assert result["new_tokens"] == 4 and isinstance(result["answer_head"], str)
    assert result["boxes"] >= 0 and "decode" in result["cpu_compute"]


def test_the_graph_decode_step_is_in_the_default_run_and_reads_its_configurations():
    assert "graph_decode" in STEPS and STEPS["graph_decode"][0][:1] == ["graph"]
    assert set(GRAPH_CONFIGS) <= set(STEPS["graph_decode"][0])
    assert [parse_graph_config(spec) for spec in GRAPH_CONFIGS] == [
        ("tiny", "bf16", None), ("tiny", "nf4", 8.0), ("small", "nf4", 8.0)
    ]  # fmt: skip
    assert parse_graph_config("small:nf4") == ("small", "nf4", None)
    for bad in ("tiny", "tiny:int4:8", "huge:bf16", "tiny:bf16:-1", "tiny:bf16:8:9"):
        with pytest.raises(ValueError):
            parse_graph_config(bad)
    with pytest.raises(ValueError, match="variant:precision"):  # before any model is loaded
        main(["graph", "tiny:nf4:8", "small"])
