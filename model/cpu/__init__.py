"""How the model is made fast on a CPU. The model never imports this package: the loader's
``model/accelerate.py`` calls :func:`accelerate`, the one entry point, for a model on the CPU.

* ``compute.py``: which dtype many-row products run in, chosen by timing this chip; installs the rest.
* ``kernels.py``: compiled one-row decode kernels (products, expert MLPs, attention).
* ``vision.py``: SigLIP's fc1 and GELU as one oneDNN product.
* ``decode.py``: Tiny's whole decode step as one compiled call per layer.
* ``native.py`` + ``csrc/tiny_decode.c``: the same step as one native call (AVX512-BF16 CPUs).
"""

from __future__ import annotations

from torch import nn

from .compute import CpuComputePlan, apply_cpu_compute


def accelerate(model: nn.Module) -> CpuComputePlan | None:
    """Install what this CPU offers the loaded model; the plan says what (None: not on the CPU)."""
    plan = apply_cpu_compute(model)
    # A CPU load leaves weights memory-mapped from the checkpoint. Every other weight is read
    # whole in the first forwards, but each new token reads one embedding row straight from the
    # file: 4.2 ms a token against 0.01 ms from memory (measured on full-size Tiny). 0.33 GB.
    embeddings = model.get_input_embeddings()
    embeddings.weight.data = embeddings.weight.data.clone()
    return plan


__all__ = ["CpuComputePlan", "accelerate", "apply_cpu_compute"]
