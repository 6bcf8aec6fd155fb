"""A key/value cache that grows in place.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, copying the
whole cache to a new allocation every step. On the CPU that copy is slow: with a 1,433-token
prompt, the 24 concatenations of a Tiny decode step took 5–45 ms (fresh pages for each new
tensor), as long as the rest of the step. :class:`GrowingLayer` keeps the cache in a buffer with
spare room and writes each step into it; only when the room runs out does it copy, to a buffer a
quarter larger (32 tokens larger for dimension-major values, below), so copies are rare and their
cost is spread over many steps.

The tensors it returns are views of the buffer, so everything that reads ``keys``/``values``
(attention, ``crop``, beam reordering) works unchanged; a layer whose tensors were replaced by
such an operation simply starts a new buffer on its next update.

Optionally the values are stored dimension-major (``[..., head_dim, tokens]``) and handed out as
a transposed view. The CPU decode attention (``model/cpu/kernels.py``) sums values over tokens;
reading them along the contiguous axis takes 0.35 ms a layer at 1,440 tokens instead of 0.74.
Such a buffer keeps only a little spare room (``DIM_MAJOR_SPARE_TOKENS``): its rows are read one
after another, and with a quarter of spare room between them the CPU's prefetchers lose the
stream at every row (full-size Tiny's values at 1,433 tokens, from memory: 0.38 ms a layer with
256 or 358 spare tokens, 0.22 ms with 64 or fewer). Copying the cache every 32 tokens costs less.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

MIN_SPARE_TOKENS = 256
DIM_MAJOR_SPARE_TOKENS = 32


def _new_buffer(like: torch.Tensor, capacity: int, dim_major: bool) -> torch.Tensor:
    lead, dim = like.shape[:-2], like.shape[-1]
    return like.new_empty((*lead, dim, capacity) if dim_major else (*lead, capacity, dim))


def _first_tokens(buffer: torch.Tensor, count: int, dim_major: bool) -> torch.Tensor:
    """The buffer's first ``count`` tokens as a ``[..., count, head_dim]`` view."""
    return buffer[..., :count].transpose(-1, -2) if dim_major else buffer[..., :count, :]


class GrowingLayer(DynamicLayer):
    def __init__(self, values_dim_major: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.values_dim_major = values_dim_major
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def _fits(self, length: int, needed: int) -> bool:
        buffer = self._key_buffer
        # At least one slot stays free: compiled decode graphs specialize on the cache's view being
        # shorter than its buffer, and a buffer filled exactly made them compile again, for about
        # 3 s, in the middle of an answer.
        if buffer is None or buffer.shape[-2] <= needed or buffer.shape[:-2] != self.keys.shape[:-2]:
            return False
        # Another operation (beam reordering, batch selection) replaced our view: start again.
        return length == 0 or buffer.data_ptr() == self.keys.data_ptr()

    def _reserve(self, key_like: torch.Tensor, value_like: torch.Tensor, length: int, needed: int) -> None:
        """Make the buffers hold ``needed`` tokens (the first ``length`` kept) and point
        ``keys``/``values`` at their first ``needed``."""
        if not self._fits(length, needed):
            spare = DIM_MAJOR_SPARE_TOKENS if self.values_dim_major else max(MIN_SPARE_TOKENS, needed // 4)
            capacity = needed + spare
            keys = _new_buffer(key_like, capacity, dim_major=False)
            values = _new_buffer(value_like, capacity, dim_major=self.values_dim_major)
            if length:
                _first_tokens(keys, length, dim_major=False).copy_(self.keys)
                _first_tokens(values, length, dim_major=self.values_dim_major).copy_(self.values)
            self._key_buffer, self._value_buffer = keys, values
        self.keys = _first_tokens(self._key_buffer, needed, dim_major=False)
        self.values = _first_tokens(self._value_buffer, needed, dim_major=self.values_dim_major)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == key_states.dim() else 0
        needed = length + key_states.shape[-2]
        self._reserve(key_states, value_states, length, needed)
        self.keys[..., length:needed, :] = key_states
        self.values[..., length:needed, :] = value_states
        return self.keys, self.values

    def extend(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Grow by ``count`` tokens whose keys and values the caller writes itself, straight into
        the returned buffers (``[..., tokens, head_dim]`` keys; values as stored), at positions
        ``length`` to ``length + count - 1``, before anything reads them. For a layer that
        already holds tokens."""
        length = self.keys.shape[-2]
        self._reserve(self.keys, self.values, length, length + count)
        return self._key_buffer, self._value_buffer

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def kv_cache_bytes(text_config, tokens: int, bytes_per_value: int = 2) -> int:
    """KV cache for ``tokens`` tokens: MLA caches its 512 + 64 latent, multi-head attention K and V."""
    layers = text_config.num_hidden_layers
    if getattr(text_config, "kv_lora_rank", None) and getattr(text_config, "qk_rope_head_dim", None):
        per_layer = text_config.kv_lora_rank + text_config.qk_rope_head_dim
    else:
        heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        per_layer = 2 * heads * head_dim
    return layers * per_layer * bytes_per_value * tokens


def growing_cache(config, values_dim_major: bool = False) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place."""
    cache = DynamicCache(config=config)
    cache.layers = [
        GrowingLayer(values_dim_major=values_dim_major) if type(layer) is DynamicLayer else layer
        for layer in cache.layers
    ]
    return cache
