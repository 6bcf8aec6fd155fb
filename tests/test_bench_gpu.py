"""The prepared GPU check (bench/gpu.py) on the CPU: its steps must work before a GPU is lent."""

from __future__ import annotations

import torch

from bench.gpu import answer, budget_offloading
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
