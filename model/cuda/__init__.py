"""Decode steps with fixed shapes, for replay as CUDA graphs (issue 24).

* ``model/cuda/static_decode.py``: :class:`StaticDecoder`, a decode step of the language model
  (Tiny's multi-head attention or Small's absorbed MLA, routed experts dispatched with fixed
  shapes) over a static key/value cache whose capacity comes in buckets. It runs anywhere; on
  the CPU it runs uncaptured (the tests compare it with the stock decoder there).
* ``model/cuda/graphs.py``: :class:`GraphRunner`, which captures that step once per (batch,
  bucket) with ``torch.cuda.CUDAGraph`` and replays it; importable without CUDA.

Nothing here is installed by the loader; ``accelerate`` below is the one call an integrator makes.
"""

from __future__ import annotations

from .graphs import GraphRunner, capture_graphs
from .static_decode import DEFAULT_BUCKETS, StaticDecoder, attach, decode_greedy, detach


def accelerate(language_model, device=None, *, max_batch: int = 1, buckets=DEFAULT_BUCKETS, capture: bool = True):
    """Build a :class:`StaticDecoder` for ``language_model``, capture its graphs where the model
    runs on CUDA (``capture``), and route ``generate``'s one-token steps through it (:func:`attach`).
    The caller still has to hand ``generate`` the decoder's cache (``decoder.new_cache()``)."""
    decoder = StaticDecoder(language_model, max_batch=max_batch, buckets=buckets, device=device)
    if capture and decoder.device.type == "cuda":
        capture_graphs(decoder, batch_sizes=tuple(range(1, max_batch + 1)))
    attach(language_model, decoder)
    return decoder


__all__ = [
    "DEFAULT_BUCKETS",
    "GraphRunner",
    "StaticDecoder",
    "accelerate",
    "attach",
    "capture_graphs",
    "decode_greedy",
    "detach",
]
