"""Routed experts as one ``nn.Linear`` trio per expert.

transformers 5 stores MoE experts as two packed 3-D parameters. bitsandbytes only quantizes
``nn.Linear`` modules, so with the packed layout a "4-bit" model keeps every routed expert in bf16
(bitsandbytes #1849) — that is 85 % of Tiny's language model. Holding each expert as its own
SwiGLU of ``nn.Linear`` layers (the official code's layout) fixes that for free:

* the parameter names are the checkpoint's names (``mlp.experts.{e}.gate_proj.weight``), so
  loading needs no merge step and peak memory stays at one tensor at a time;
* ``BitsAndBytesConfig`` swaps each of them for ``Linear4bit``/``Linear8bitLt`` as it loads;
* a decode step runs only the experts its token was routed to, touching only their weights.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class ExpertMLP(nn.Module):
    """One SwiGLU expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class RoutedExperts(nn.ModuleList):
    """Drop-in for transformers' packed experts: same call ``(hidden, top_k_index, top_k_weights)``."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str, num_experts_per_tok: int
    ) -> None:
        super().__init__(ExpertMLP(hidden_size, intermediate_size, hidden_act) for _ in range(num_experts))
        self.num_experts_per_tok = num_experts_per_tok

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # The official model mixes expert outputs in fp32 (its routing weights are fp32); so do we.
        if hidden_states.shape[0] == 1:  # a decode step: just the chosen experts, nothing to sort
            weights = top_k_weights[0].float()
            mixed = None
            for slot, expert_id in enumerate(top_k_index[0].tolist()):
                out = self[expert_id](hidden_states).float() * weights[slot]
                mixed = out if mixed is None else mixed + out
            return mixed.to(hidden_states.dtype)
        mixed = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
        flat_experts = top_k_index.reshape(-1)
        token_of_slot = torch.arange(hidden_states.shape[0], device=hidden_states.device).repeat_interleave(
            top_k_index.shape[1]
        )
        order = torch.argsort(flat_experts, stable=True)
        counts = torch.bincount(flat_experts, minlength=len(self)).tolist()
        tokens = token_of_slot[order]
        # One gather for all experts, so that each expert's rows are a contiguous slice (index_select
        # copies whole rows: 1.4 against 9.8 ms a layer with indexing, for Tiny's 1,433-token
        # prefill); and the weights in fp32, so that one multiply both upcasts an expert's output
        # and weighs it.
        sorted_hidden = hidden_states.index_select(0, tokens)
        flat_weights = top_k_weights.reshape(-1)[order].float()[:, None]
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            out = self[expert_id](sorted_hidden[start:end])
            mixed.index_add_(0, tokens[start:end], out * flat_weights[start:end])
            start = end
        return mixed.to(hidden_states.dtype)


def install_routed_experts(language_model: nn.Module, text_config) -> int:
    """Replace every packed experts module under ``language_model`` by :class:`RoutedExperts`.

    Runs inside the model constructor (on the meta device during ``from_pretrained``), so nothing
    is allocated twice. Returns the number of MoE layers converted.
    """
    converted = 0
    for module in language_model.modules():
        experts = getattr(module, "experts", None)
        if experts is None or isinstance(experts, RoutedExperts) or not hasattr(experts, "gate_up_proj"):
            continue
        module.experts = RoutedExperts(
            text_config.n_routed_experts,
            text_config.hidden_size,
            text_config.moe_intermediate_size,
            text_config.hidden_act,
            text_config.num_experts_per_tok,
        )
        converted += 1
    return converted
