"""Absorbed multi-head latent attention for decoding (Small and base).

transformers 5 caches MLA's compressed latent (512 + 64 values per token and layer) but, on every
decode step, re-expands the whole cache through ``kv_b_proj`` into per-head keys and values — work
that grows with the context. Since ``kv_b_proj`` is linear it can be folded ("absorbed") instead:

* the key half goes into the query:  ``q_nope · W_uk`` gives a 512-d query per head, scored
  directly against the cached latents (plus the usual RoPE part against the cached rope keys);
* the value half goes after the attention: the softmax-weighted sum of latents is multiplied by
  ``W_uv``.

The result is the same attention (checked against the stock path in fp32), at a per-step cost that
no longer multiplies the context length by ``kv_b_proj``'s size. Prefill keeps the stock path:
with many queries, expanding once and using SDPA is the better trade.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as v2
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as v3

MAX_ABSORBED_QUERY = 16  # decode steps (and short appends) take the absorbed path


def _rope(attention: nn.Module, q_rot: torch.Tensor, k_rot: torch.Tensor, position_embeddings):
    if isinstance(attention, v2.DeepseekV2Attention):
        return v2.apply_rotary_emb(q_rot, k_rot, position_embeddings.to(q_rot.device))
    cos, sin = position_embeddings
    if attention.config.rope_interleave:
        return v3.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
    return v3.apply_rotary_pos_emb(q_rot, k_rot, cos, sin)


def absorbed_attention(
    attention: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache,
    position_embeddings,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    batch, length, _ = hidden_states.shape
    nope, rope, value = attention.qk_nope_head_dim, attention.qk_rope_head_dim, attention.v_head_dim
    rank, heads = attention.kv_lora_rank, attention.num_heads

    q = attention.q_proj(hidden_states).view(batch, length, heads, nope + rope).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [nope, rope], dim=-1)
    latent, k_rot = torch.split(attention.kv_a_proj_with_mqa(hidden_states), [rank, rope], dim=-1)
    latent = attention.kv_a_layernorm(latent).view(batch, 1, length, rank)
    k_rot = k_rot.view(batch, 1, length, rope)
    q_rot, k_rot = _rope(attention, q_rot, k_rot, position_embeddings)
    latent, k_rot = cache.update(latent, k_rot, attention.layer_idx, kwargs=kwargs)

    weight = attention.kv_b_proj.weight.view(heads, nope + value, rank)
    w_key, w_value = weight[:, :nope], weight[:, nope:]
    q_latent = torch.einsum("bhqn,hnc->bhqc", q_nope, w_key)
    scores = (q_latent @ latent.transpose(-1, -2) + q_rot @ k_rot.transpose(-1, -2)) * attention.scaling
    if attention_mask is not None:
        mask = attention_mask[..., : scores.shape[-1]]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
    out = torch.einsum("bhqc,hvc->bhqv", probs @ latent, w_value)
    out = out.transpose(1, 2).reshape(batch, length, heads * value)
    return attention.o_proj(out), None


def install_absorbed_mla(language_model: nn.Module) -> int:
    """Route decode steps of every MLA attention module through :func:`absorbed_attention`."""
    installed = 0
    for module in language_model.modules():
        if not isinstance(module, v2.DeepseekV2Attention | v3.DeepseekV3Attention):
            continue
        stock = module.forward

        def forward(hidden_states, attention_mask=None, cache=None, position_embeddings=None, _stock=stock,
                    _module=module, **kwargs):  # fmt: skip
            decoding = (
                getattr(_module, "absorb", True)
                and cache is not None
                and hidden_states.shape[1] <= MAX_ABSORBED_QUERY
                and cache.get_seq_length(_module.layer_idx) > 0
                and _module.kv_b_proj.weight.dtype.is_floating_point
            )
            if decoding:
                return absorbed_attention(_module, hidden_states, attention_mask, cache, position_embeddings, **kwargs)
            return _stock(
                hidden_states=hidden_states,
                attention_mask=attention_mask,
                cache=cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        module.forward = forward
        installed += 1
    return installed


def set_absorbed_mla(language_model: nn.Module, enabled: bool) -> None:
    """Switch the absorbed decode path on or off (for comparisons and benchmarks)."""
    for module in language_model.modules():
        if isinstance(module, v2.DeepseekV2Attention | v3.DeepseekV3Attention):
            module.absorb = enabled
