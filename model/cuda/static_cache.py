"""The static key/value cache of :class:`~model.cuda.static_decode.StaticDecoder`.

One buffer per layer holds ``capacity`` tokens; what the stock forward writes (a prefill) lands
where the static step reads, and the step writes its token at a device-side ``slot``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from .static_decode import StaticDecoder


class _SlotWriter:
    """Stands in for the cache inside one step: writes the step's key and value at ``slot`` and
    hands the attention the bucket's first ``bucket`` slots."""

    def __init__(self, decoder: StaticDecoder, batch: int, bucket: int) -> None:
        self.decoder, self.batch, self.bucket = decoder, batch, bucket

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys = self.decoder.cache_keys[layer_idx][: self.batch]
        values = self.decoder.cache_values[layer_idx][: self.batch]
        keys.index_copy_(2, self.decoder.slot, key_states)
        values.index_copy_(2, self.decoder.slot, value_states)
        return keys[:, :, : self.bucket], values[:, :, : self.bucket]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.bucket


class StaticLayer(DynamicLayer):
    """A cache layer whose tensors are views of the decoder's static buffers: what the stock
    forward (a prefill, a chunk) writes lands where the static step reads."""

    def __init__(self, decoder: StaticDecoder, index: int) -> None:
        super().__init__()
        self.decoder, self.index = decoder, index
        self.length, self.batch = 0, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if key_states.shape[0] > self.decoder.max_batch:
            batch, most = key_states.shape[0], self.decoder.max_batch
            raise ValueError(f"a batch of {batch} is more than the static cache's {most}")
        self.device, self.batch = key_states.device, key_states.shape[0]
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        end = self.length
        self.keys = self.decoder.cache_keys[self.index][: self.batch, :, :end]
        self.values = self.decoder.cache_values[self.index][: self.batch, :, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.decoder.capacity:
            raise ValueError(f"{end} tokens do not fit the static cache ({self.decoder.capacity})")
        self.decoder.cache_keys[self.index][: self.batch, :, start:end] = key_states
        self.decoder.cache_values[self.index][: self.batch, :, start:end] = value_states
        if self.index == 0:  # no mask known here: the tokens count (a padding mask, if any, comes later)
            self.decoder.valid[: self.batch, start:end] = True
        self.length = end
        self._views()
        return self.keys, self.values

    def advance(self, count: int = 1) -> None:
        self.length += count
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count")
        self.length = max(0, self.length + tokens_to_remove)
        self._views()

    def reset(self) -> None:
        self.length = 0
        if self.is_initialized:
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("the static cache does not expand batches (beam search, several sequences)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the static cache does not select batch rows")


class StaticKVCache(DynamicCache):
    """A ``DynamicCache`` whose layers live in a :class:`StaticDecoder`'s buffers. Valid until the
    decoder makes its next cache."""

    def __init__(self, decoder: StaticDecoder) -> None:
        super().__init__(config=decoder.config)
        self.layers = [StaticLayer(decoder, index) for index in range(decoder.num_layers)]
        self.decoder, self.epoch = decoder, decoder.epoch

    @property
    def current(self) -> bool:
        return self.epoch == self.decoder.epoch

    @property
    def batch(self) -> int:
        return self.layers[0].batch

    def advance(self, count: int = 1) -> None:
        for layer in self.layers:
            layer.advance(count)
