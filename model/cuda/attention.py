"""The language model's attention on a CUDA GPU: PyTorch's SDPA with cuDNN's backend left out.

On Hopper GPUs SDPA picks cuDNN's attention, which builds (and caches) an execution graph for
every new shape. Each decode step attends over one more key than the last, so every step of a new
answer built one: measured on an H200, full-size Tiny decoded 54.8 ms a token at lengths it had
not seen against 21.8 ms at lengths it had, and a bare decode loop over fresh lengths still took
55.8 ms a token once only ``generate`` left cuDNN out. Flash and memory-efficient attention take
any length as it comes. Vision keeps cuDNN: all its tiles have one shape.

Switched per call rather than for the whole process, so that other models in the same process
keep PyTorch's choice; the switch costs about 1 µs (``sdpa_kernel`` costs 10 µs).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "vl2_sdpa_any_length"


def any_length_sdpa(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, with cuDNN's backend off for the call."""
    cudnn_was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_was_enabled)


def use_any_length_attention(language: nn.Module) -> bool:
    """Route ``language``'s SDPA attention through :func:`any_length_sdpa` (same masks as SDPA).

    Returns whether it did: models loaded with another attention implementation keep theirs.
    """
    if getattr(language.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(ATTENTION_NAME, any_length_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    language.set_attn_implementation(ATTENTION_NAME)
    return True
