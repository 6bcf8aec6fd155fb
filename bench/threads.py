"""Decode speed on the compute thread against a fresh thread per answer (model/compute_thread.py).

    python -m bench.threads [--full-size] [--rounds 3] [--tokens 33]

Both generate the same greedy answer to a grounding query with the same loaded model; each step's
time comes from a stopping criterion's timestamps (the median step, the first two left out), in
rounds that alternate which goes first. A fresh thread is how generation ran before: its OpenMP
team joins the loading thread's, and both then sleep between parallel regions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from model import compute_thread
from model.generation import GenerationSettings
from model.loading import load_model
from model.processing import Message

from .__main__ import build, without_reuse
from .gpu import GROUNDING_QUERY, test_image


class StepTimes(StoppingCriteria):
    """Called once per generated token: a timestamp per step, never a stop."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def median_step_ms(self) -> float:
        steps = [later - earlier for earlier, later in zip(self.stamps[2:], self.stamps[3:], strict=False)]
        return 1e3 * statistics.median(steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__.split("\n")[0])
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=33)
    args = parser.parse_args(argv)
    loaded = without_reuse(load_model(build("tiny", args.full_size), device="cpu", dtype="bf16"))
    special = loaded.processor.special
    conversation = [Message("user", GROUNDING_QUERY, [test_image()])]
    settings = GenerationSettings(
        max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0.0, repetition_penalty=1.0
    )

    def generate(times: StepTimes) -> None:
        inputs = loaded.processor(conversation)
        loaded.model.generate(
            **inputs,
            eos_token_id=special.eos,
            pad_token_id=special.pad,
            stopping_criteria=StoppingCriteriaList([times]),
            **settings.generate_kwargs(),
        )

    def on_compute_thread() -> float:
        times = StepTimes()
        compute_thread.run(generate, times)
        return times.median_step_ms()

    def on_a_fresh_thread() -> float:
        times = StepTimes()
        worker = threading.Thread(target=generate, args=(times,))
        worker.start()
        worker.join()
        return times.median_step_ms()

    ways = {"compute_thread_ms": on_compute_thread, "fresh_thread_ms": on_a_fresh_thread}
    for way in ways.values():  # warm-up: compiled kernels, caches
        way()
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for round_index in range(args.rounds):
        for name in list(ways)[:: 1 if round_index % 2 == 0 else -1]:
            samples[name].append(round(ways[name](), 1))
    ratios = [fresh / own for fresh, own in zip(samples["fresh_thread_ms"], samples["compute_thread_ms"], strict=True)]
    print(json.dumps({**samples, "fresh_over_compute_thread": round(statistics.median(ratios), 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
