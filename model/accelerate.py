"""The one place device-specific speed is installed: ``accelerate(model, device)`` at load.

The model's own files (configuration, modeling, language, experts, processing…) never import a
device package; each device package (``model/cpu/``, ``model/cuda/``) exposes one ``accelerate``
entry point, and this module picks the one for the device the model was loaded on. Weights that
:mod:`model.placement` left on the CPU beside a GPU get the CPU's treatment from there.
"""

from __future__ import annotations

import torch
from torch import nn


def accelerate(model: nn.Module, device: str | torch.device) -> str:
    """Install what ``device`` offers the loaded ``model``; a line for the load summary ("" if nothing)."""
    kind = torch.device(device).type
    if kind == "cpu":
        from .cpu import accelerate as on_cpu

        plan = on_cpu(model)
        return plan.describe() if plan is not None else ""
    if kind == "cuda":
        from .cuda import accelerate as on_cuda

        return on_cuda(model)
    return ""
