"""Capture a :class:`~model.cuda.static_decode.StaticDecoder`'s step as CUDA graphs and replay it.

One graph (or, with experts computed on the CPU, one graph per GPU segment between them) per
(batch, bucket), captured once — at load, before any generation — and replayed per token: a
replay is one launch for the whole step instead of about a thousand. All graphs share one memory
pool; they never run at the same time, and everything that outlives a segment is in the
decoder's static tensors, so the pool only holds one step's temporaries.

Importable without CUDA; capturing needs it. Nothing here runs in the CPU tests: the graphs replay
exactly the kernels of the uncaptured step, which the tests compare with the stock decoder.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .static_decode import Segment, StaticDecoder, _no_cudnn_attention


@dataclass
class CaptureStats:
    seconds: dict[tuple[int, int], float] = field(default_factory=dict)
    graphs: int = 0
    pool_bytes: int = 0  # growth of the allocator's reserved memory over all captures

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


class GraphRunner:
    """Per (batch, bucket), the step's segments with a ``torch.cuda.CUDAGraph`` for each
    capturable one (eager segments, e.g. CPU-resident experts, run between replays)."""

    def __init__(self, decoder: StaticDecoder, warmup: int = 2) -> None:
        if decoder.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA decoder, not {decoder.device}")
        self.decoder = decoder
        self.warmup = warmup
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], list[tuple[Segment, torch.cuda.CUDAGraph | None]]] = {}
        self.stats = CaptureStats()

    def has(self, batch: int, bucket: int) -> bool:
        return (batch, bucket) in self.graphs

    @torch.inference_mode()
    def capture(self, batch: int, bucket: int) -> float:
        """Capture the step for ``batch`` rows over ``bucket`` slots; returns the seconds it took.

        Warm-up runs execute the step for real: they write slot ``capacity - 1`` (never a live
        token while a generation fits) and the step's state, so capture only while the decoder is
        idle; :meth:`StaticDecoder.reset` follows."""
        decoder = self.decoder
        if batch > decoder.max_batch or bucket not in decoder.buckets:
            raise ValueError(f"no static shape for batch {batch}, bucket {bucket}")
        start = time.perf_counter()
        segments = decoder.segments(batch, bucket)
        decoder.input_ids[:batch].zero_()
        decoder.position_ids[:batch].zero_()
        decoder.slot.fill_(decoder.capacity - 1)
        stream = torch.cuda.Stream(device=decoder.device)
        stream.wait_stream(torch.cuda.current_stream(decoder.device))
        with torch.cuda.stream(stream), _no_cudnn_attention(decoder.device):
            for _ in range(self.warmup):  # lazy initialization, library handles, autotuning
                for segment in segments:
                    segment.run()
        torch.cuda.current_stream(decoder.device).wait_stream(stream)
        torch.cuda.synchronize(decoder.device)
        captured: list[tuple[Segment, torch.cuda.CUDAGraph | None]] = []
        with _no_cudnn_attention(decoder.device):
            for segment in segments:
                if not segment.capturable:
                    captured.append((segment, None))
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    segment.run()
                captured.append((segment, graph))
        torch.cuda.synchronize(decoder.device)
        decoder.valid[:, decoder.capacity - 1] = False
        self.graphs[(batch, bucket)] = captured
        seconds = time.perf_counter() - start
        self.stats.seconds[(batch, bucket)] = seconds
        self.stats.graphs += sum(graph is not None for _, graph in captured)
        return seconds

    def run(self, batch: int, bucket: int) -> bool:
        """Replay the step for (batch, bucket); False if it was not captured."""
        captured = self.graphs.get((batch, bucket))
        if captured is None:
            return False
        for segment, graph in captured:
            if graph is None:
                segment.run()
            else:
                graph.replay()
        return True


def capture_graphs(
    decoder: StaticDecoder, batch_sizes: Iterable[int] = (1,), buckets: Iterable[int] | None = None
) -> GraphRunner:
    """Capture every (batch, bucket) asked for and install the runner on ``decoder``: its
    :meth:`~StaticDecoder.step` replays from then on (shapes not captured still run uncaptured).
    The decoder is reset afterwards (no cache survives a capture)."""
    runner = GraphRunner(decoder)
    before = torch.cuda.memory_reserved(decoder.device)
    for batch in batch_sizes:
        for bucket in buckets or decoder.buckets:
            runner.capture(batch, bucket)
    runner.stats.pool_bytes = torch.cuda.memory_reserved(decoder.device) - before
    decoder.runner = runner
    decoder.reset()
    return runner
