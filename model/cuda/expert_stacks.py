"""Routed experts dispatched with fixed shapes, for a decode step a CUDA graph can capture.

``model/experts.py`` runs each chosen expert on its own, choosing them from the data on the host
(``.tolist()``). Here each MoE layer's experts are stacked once ([E, 2I, H] gate+up, [E, H, I]
down) and a step gathers the chosen ones (``index_select``) and multiplies them with ``bmm``, or,
when a batch picks at least as many (token, expert) pairs as there are experts, runs all experts
and weighs them with a dense map. The per-expert ``nn.Linear`` weights are re-pointed into the
stacks, so nothing is held twice. bitsandbytes 4-bit experts are stacked as packed codes and
block scales (re-pointed the same way) and the chosen ones dequantized per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


def is_4bit(linear: nn.Module) -> bool:
    return getattr(getattr(linear, "weight", None), "quant_state", None) is not None


class ExpertStack:
    """One MoE layer's routed experts for fixed-shape dispatch. ``__call__(x [T, H], index [T, k],
    weights [T, k]) -> [T, H]``: the same mixture as ``RoutedExperts`` (each expert's output in
    the activations' dtype, weighed and summed in fp32, cast back)."""

    num_experts: int
    hidden: int
    width: int
    act: Callable[[torch.Tensor], torch.Tensor]
    dense_when_full: bool = True  # may run all experts once a batch picks as many as there are
    added_bytes: int = 0  # device memory this stack holds beyond the model's own weights

    def weights(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate+up [M, 2I, H] and down [M, H, I] for the experts ``index`` ([M]; None: all)."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tokens, top_k = index.shape
        if self.dense_when_full and tokens * top_k >= self.num_experts:
            return self._all_experts(x, index, weights)
        flat = index.reshape(-1)
        gate_up, down = self.weights(flat)
        rows = x.repeat_interleave(top_k, dim=0).unsqueeze(1)  # [T*k, 1, H]
        gate, up = torch.bmm(rows, gate_up.transpose(1, 2)).split(self.width, dim=-1)
        out = torch.bmm(self.act(gate) * up, down.transpose(1, 2)).view(tokens, top_k, self.hidden)
        return (out.float() * weights.float().unsqueeze(-1)).sum(1).to(x.dtype)

    def _all_experts(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        gate_up, down = self.weights(None)
        rows = x.unsqueeze(0).expand(self.num_experts, *x.shape)  # [E, T, H]
        gate, up = torch.bmm(rows, gate_up.transpose(1, 2)).split(self.width, dim=-1)
        out = torch.bmm(self.act(gate) * up, down.transpose(1, 2))  # [E, T, H]
        chosen = torch.zeros(x.shape[0], self.num_experts, dtype=torch.bool, device=x.device)
        chosen.scatter_(1, index, True)
        scale = torch.zeros(x.shape[0], self.num_experts, dtype=torch.float32, device=x.device)
        scale.scatter_(1, index, weights.float())
        # where(), not a product with zero: an expert nobody chose must not bring in an inf.
        mixed = torch.where(chosen.T.unsqueeze(-1), out.float() * scale.T.unsqueeze(-1), 0.0)
        return mixed.sum(0).to(x.dtype)


def _describe(experts: nn.ModuleList) -> tuple[int, int, int, Callable]:
    first = experts[0]
    return len(experts), first.gate_proj.in_features, first.gate_proj.out_features, first.act_fn


class DenseExpertStack(ExpertStack):
    """Full-precision experts stacked into two tensors; with ``share`` each expert's linears are
    re-pointed to views of the stacks (no second copy; built one layer at a time)."""

    def __init__(self, experts: nn.ModuleList, share: bool = True) -> None:
        self.num_experts, self.hidden, self.width, self.act = _describe(experts)
        weight = experts[0].gate_proj.weight
        if any(lin.bias is not None for ex in experts for lin in (ex.gate_proj, ex.up_proj, ex.down_proj)):
            raise ValueError("routed experts with biases are not supported")
        shape = (self.num_experts, 2 * self.width, self.hidden)
        self.gate_up = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.down = torch.empty((self.num_experts, self.hidden, self.width), dtype=weight.dtype, device=weight.device)
        for e, expert in enumerate(experts):
            self.gate_up[e, : self.width].copy_(expert.gate_proj.weight)
            self.gate_up[e, self.width :].copy_(expert.up_proj.weight)
            self.down[e].copy_(expert.down_proj.weight)
            if share:
                expert.gate_proj.weight = nn.Parameter(self.gate_up[e, : self.width], requires_grad=False)
                expert.up_proj.weight = nn.Parameter(self.gate_up[e, self.width :], requires_grad=False)
                expert.down_proj.weight = nn.Parameter(self.down[e], requires_grad=False)
        self.added_bytes = 0 if share else nbytes(self.gate_up, self.down)

    def weights(self, index):
        if index is None:
            return self.gate_up, self.down
        return self.gate_up.index_select(0, index), self.down.index_select(0, index)


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _standard_4bit(linear: nn.Module) -> tuple[torch.Tensor, object]:
    """A 4-bit weight's packed codes (flat uint8) and quant state, in bitsandbytes' standard layout."""
    data, state = linear.weight.data, linear.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes' AVX512 CPU kernel repacks a weight at its first CPU call, rounding the block
        # scales to bf16; undoing that is lossy and rewrites the layer's state. Only on the CPU.
        raise ValueError(
            "a 4-bit expert was repacked for bitsandbytes' CPU kernel; stack the experts before "
            "their first CPU call, or turn the repacking off (support_avx512bf16_for_cpu = False)"
        )
    return data.reshape(-1).view(torch.uint8), state


class Packed4bit:
    """The 4-bit weights of one kind (gate+up, or down) of all of a layer's experts, stacked:
    codes [E, bytes], block scales (double-quantized ones as their 8-bit codes, second-level
    scales and offsets), and how to dequantize the rows of chosen experts with fixed shapes."""

    def __init__(self, per_expert: Sequence[Sequence[nn.Module]], share: bool) -> None:
        first = per_expert[0][0].weight.quant_state
        self.blocksize, self.quant_type, self.nested = first.blocksize, first.quant_type, first.nested
        self.code = first.code.float()
        device = per_expert[0][0].weight.device
        parts = [[_standard_4bit(linear) for linear in linears] for linears in per_expert]
        for linears in parts:
            for _data, state in linears:
                if (state.blocksize, state.quant_type, state.nested) != (self.blocksize, self.quant_type, self.nested):
                    raise ValueError("experts quantized with different 4-bit settings")
                if not torch.equal(state.code.float(), self.code):
                    raise ValueError("experts with different 4-bit code books")
                if math.prod(state.shape) % self.blocksize:
                    raise ValueError(f"a 4-bit expert of shape {tuple(state.shape)} is not whole blocks")
        self.codes = torch.stack([torch.cat([data for data, _ in linears]) for linears in parts])
        if self.nested:
            state2 = first.state2
            self.code2 = state2.code.float()
            self.absmax = torch.stack([torch.cat([s.absmax.reshape(-1) for _, s in linears]) for linears in parts])
            self.absmax2 = torch.stack(
                [torch.cat([s.state2.absmax.reshape(-1).float() for _, s in linears]) for linears in parts]
            )
            self.offsets = torch.stack(
                [torch.stack([torch.as_tensor(s.offset, device=device).float().reshape(()) for _, s in linears])
                 for linears in parts]
            )  # fmt: skip
            nested_index, part_index, start2 = [], [], 0
            for p, (_, state) in enumerate(parts[0]):
                blocks = state.absmax.numel()
                if state.state2.blocksize != state2.blocksize or not torch.equal(state.state2.code.float(), self.code2):
                    raise ValueError("experts with different second-level 4-bit statistics")
                nested_index.append(start2 + torch.arange(blocks, device=device) // state2.blocksize)
                part_index.append(torch.full((blocks,), p, device=device))
                start2 += state.state2.absmax.numel()
            self.nested_index = torch.cat(nested_index)
            self.part_index = torch.cat(part_index)
        else:
            self.absmax = torch.stack([torch.cat([s.absmax.reshape(-1).float() for _, s in linears])
                                       for linears in parts])  # fmt: skip
        if share:
            self._share(per_expert, parts)
        stacked = [self.codes, self.absmax] + ([self.absmax2, self.offsets] if self.nested else [])
        self.added_bytes = nbytes(self.offsets) if share and self.nested else 0 if share else nbytes(*stacked)

    def _share(self, per_expert, parts) -> None:
        """Point every expert's packed weight and statistics at its rows of the stacks."""
        for e, linears in enumerate(per_expert):
            byte, block, block2 = 0, 0, 0
            for linear, (data, state) in zip(linears, parts[e], strict=True):
                weight = linear.weight
                weight.data = self.codes[e, byte : byte + data.numel()].view(weight.data.dtype).view(weight.data.shape)
                byte += data.numel()
                blocks = state.absmax.numel()
                state.absmax = self.absmax[e, block : block + blocks]
                block += blocks
                if self.nested:
                    blocks2 = state.state2.absmax.numel()
                    state.state2.absmax = self.absmax2[e, block2 : block2 + blocks2]
                    block2 += blocks2

    def scales(self, index: torch.Tensor | None) -> torch.Tensor:
        """fp32 block scales [M, blocks] of experts ``index`` (None: all), as bitsandbytes computes
        them: second-level code × second-level scale, plus the tensor's offset."""

        def pick(t):
            return t if index is None else t.index_select(0, index)

        if not self.nested:
            return pick(self.absmax)
        codes = pick(self.absmax).long()
        return self.code2[codes] * pick(self.absmax2)[:, self.nested_index] + pick(self.offsets)[:, self.part_index]

    def dequantize(self, index: torch.Tensor | None, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        codes = self.codes if index is None else self.codes.index_select(0, index)
        scales = self.scales(index)
        rows = codes.shape[0]
        if codes.is_cuda:  # bitsandbytes' kernel: one pass, on the current (capturing) stream
            import bitsandbytes.functional as bnb_functional

            out = torch.empty((rows, *shape), dtype=dtype, device=codes.device)
            flat_codes, flat_scales = codes.reshape(-1), scales.reshape(-1)
            bnb_functional.dequantize_4bit(
                flat_codes, absmax=flat_scales, out=out, blocksize=self.blocksize, quant_type=self.quant_type
            )
            return out
        return dequantize_4bit_reference(codes, scales, self.code, self.blocksize, (rows, *shape), dtype)


def dequantize_4bit_reference(
    codes: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, blocksize: int, shape: Sequence[int], dtype
) -> torch.Tensor:
    """bitsandbytes' 4-bit dequantization in plain torch: the high nibble is the first value,
    each value is its code book entry times its block's fp32 scale, then cast."""
    rows = codes.shape[0]
    nibbles = torch.stack((codes >> 4, codes & 0xF), dim=-1).reshape(rows, -1).long()
    values = code[nibbles].view(rows, -1, blocksize) * scales.view(rows, -1, 1)
    return values.view(*shape).to(dtype)


class Expert4bitStack(ExpertStack):
    """bitsandbytes 4-bit experts: the chosen ones dequantized each step (always gathered: all
    64 of Small's experts dequantized at once would be a 0.7 GB temporary)."""

    dense_when_full = False

    def __init__(self, experts: nn.ModuleList, dtype: torch.dtype, share: bool = True) -> None:
        self.num_experts, self.hidden, self.width, self.act = _describe(experts)
        if any(lin.bias is not None for ex in experts for lin in (ex.gate_proj, ex.up_proj, ex.down_proj)):
            raise ValueError("routed experts with biases are not supported")
        self.dtype = dtype
        self.gate_up = Packed4bit([(ex.gate_proj, ex.up_proj) for ex in experts], share)
        self.down = Packed4bit([(ex.down_proj,) for ex in experts], share)
        self.added_bytes = self.gate_up.added_bytes + self.down.added_bytes

    def weights(self, index):
        gate_up = self.gate_up.dequantize(index, (2 * self.width, self.hidden), self.dtype)
        return gate_up, self.down.dequantize(index, (self.hidden, self.width), self.dtype)


def stack_experts(experts: nn.ModuleList, dtype: torch.dtype, share: bool = True) -> ExpertStack:
    linears = [lin for ex in experts for lin in (ex.gate_proj, ex.up_proj, ex.down_proj)]
    if all(is_4bit(lin) for lin in linears):
        return Expert4bitStack(experts, dtype, share)
    if any(is_4bit(lin) or not lin.weight.dtype.is_floating_point for lin in linears):
        raise ValueError("routed experts must be all full precision or all bitsandbytes 4-bit (8-bit is not supported)")
    return DenseExpertStack(experts, share)


def route(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice for ``x``: ``(index [T, k], weights [T, k])``."""
    out = mlp.gate(x)
    if isinstance(out, tuple):
        _, weights, index = out
        return index, weights
    return mlp.route_tokens_to_experts(out)  # routers that return only their logits
