"""How the model is made fast on a CUDA GPU. The model never imports this package: the loader's
``model/accelerate.py`` calls :func:`accelerate`, the one entry point, for a model on CUDA.

* ``attention.py``: SDPA without cuDNN's per-length graphs (installed by :func:`accelerate`).
* ``static_decode.py``: :class:`StaticDecoder`, a decode step with fixed shapes (static key/value
  cache in capacity buckets; routed experts gathered and multiplied with fixed shapes, 4-bit
  ones dequantized per step; Small's absorbed MLA). It runs anywhere, uncaptured on a CPU.
* ``graphs.py``: captures that step once per (batch, bucket) with ``torch.cuda.CUDAGraph``.

The graph decoder is not installed at load yet: it waits for its numbers on a GPU (issue 24;
``python -m bench.gpu --steps graph_decode``). :func:`install_static_decode` is the explicit call.
"""

from __future__ import annotations

from torch import nn

from .attention import use_any_length_attention
from .graphs import GraphRunner, capture_graphs
from .static_decode import DEFAULT_BUCKETS, StaticDecoder, attach, decode_greedy, detach


def accelerate(model: nn.Module) -> str:
    """Install what a CUDA device offers the loaded model; a line for the load summary."""
    if use_any_length_attention(model.language):
        return "attention: SDPA at any length (no cuDNN graph per shape)"
    return ""


def install_static_decode(
    language_model: nn.Module, device=None, *, max_batch: int = 1, buckets=DEFAULT_BUCKETS, capture: bool = True
) -> StaticDecoder:
    """Build a :class:`StaticDecoder` for ``language_model``, capture its graphs where the model
    runs on CUDA (``capture``), and route ``generate``'s one-token steps through it (:func:`attach`).
    The caller hands ``generate`` the decoder's cache (``decoder.new_cache()``)."""
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
    "install_static_decode",
]
