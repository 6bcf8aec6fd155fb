"""The key/value cache of recent conversations, so the next turn prefills only its new tokens.

A follow-up question, a retry, a Find after an Ask about the same photo: each new prompt starts
with tokens whose keys and values a finished generation already holds (the image's 400–2,000
tokens among them). An entry keeps that cache with the tokens and the input embeddings it was
computed from; a new prompt reuses the longest prefix whose token ids *and* embeddings are equal —
the embeddings tell two different images apart, whose placeholder ids are the same. A trimmed
history starts differently and shares nothing, so it is computed afresh.

Entries are taken out while a generation extends them and put back only when it returns normally
(an error mid-forward could leave a layer half-written); least-recently-used entries go beyond a
byte budget.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers import Cache

from .environment import read_float

DEFAULT_MB = 384  # a few conversations of Tiny in bf16 (about 60 KiB a token)
GPU_DEFAULT_MB = 128  # on a GPU the entries hold device memory the placement plan did not count
ENV = "VL2_PREFIX_CACHE_MB"  # 0 turns the reuse off
MIN_REUSE = 16  # shorter shared prefixes (the bos and a role tag) are not worth an entry's cache


def cache_bytes(cache: Cache) -> int:
    """Memory a cache holds: its layers' buffers (spare room included), else their tensors."""
    total = 0
    for layer in cache.layers:
        buffers = (getattr(layer, "_key_buffer", None), getattr(layer, "_value_buffer", None))
        tensors = buffers if buffers[0] is not None else (getattr(layer, "keys", None), getattr(layer, "values", None))
        total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


def crop(cache: Cache, length: int) -> None:
    """Keep the first ``length`` tokens of every layer (views of the same buffers)."""
    for layer in cache.layers:
        held = layer.get_seq_length()
        if held > length:
            layer.crop(length - held)


@dataclass
class Entry:
    ids: list[int]  # the tokens whose keys and values are in the cache, in order
    embeds: torch.Tensor  # [tokens, hidden]: the inputs they were computed from
    cache: Cache
    size: int


@dataclass(frozen=True)
class PrefixStats:
    reused_tokens: int
    computed_tokens: int
    entries: int
    bytes_held: int
    budget_bytes: int

    def summary(self) -> str:
        return (
            f"conversation prefixes: {self.reused_tokens:,} tokens reused, {self.computed_tokens:,} prefilled; "
            f"{self.entries} kept, {self.bytes_held / 2**20:.1f} of {self.budget_bytes / 2**20:.0f} MiB held"
        )


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: list[Entry] = []  # least recently used first
        self._lock = threading.Lock()
        self.reused_tokens = 0
        self.computed_tokens = 0

    @classmethod
    def from_env(cls, *, on_gpu: bool = False) -> PrefixCache | None:
        """The cache ``VL2_PREFIX_CACHE_MB`` asks for (else the default for the device); None when it is 0."""
        megabytes = read_float(ENV, GPU_DEFAULT_MB if on_gpu else DEFAULT_MB)
        return cls(int(megabytes * 2**20)) if megabytes > 0 else None

    @staticmethod
    def shared_length(entry: Entry, ids: list[int], embeds: torch.Tensor) -> int:
        """How many leading tokens of a prompt ``entry`` already holds (equal ids and embeddings)."""
        length = 0
        for held, wanted in zip(entry.ids, ids, strict=False):
            if held != wanted:
                break
            length += 1
        if length == 0:
            return 0
        differs = (entry.embeds[:length] != embeds[:length].to(entry.embeds.device)).any(dim=-1)
        mismatch = torch.nonzero(differs)
        return int(mismatch[0, 0]) if mismatch.numel() else length

    def take(self, ids: list[int], embeds: torch.Tensor) -> Cache | None:
        """The cache of the entry sharing the longest prefix with this prompt, cropped to that prefix
        (and taken out of the store); None when none is worth it.

        At least the prompt's last token is left to compute: generation starts from its logits.
        """
        with self._lock:
            best, best_length = None, 0
            for entry in self._entries:
                length = min(self.shared_length(entry, ids, embeds), len(ids) - 1)
                if length > best_length:
                    best, best_length = entry, length
            if best is None or best_length < MIN_REUSE:
                self.computed_tokens += len(ids)
                return None
            self._entries.remove(best)
            self.reused_tokens += best_length
            self.computed_tokens += len(ids) - best_length
        crop(best.cache, best_length)
        return best.cache

    def put(self, ids: list[int], embeds: torch.Tensor, cache: Cache) -> None:
        """Keep ``cache`` (holding exactly ``ids``) for later prompts that start the same way."""
        length = cache.get_seq_length()
        if length < MIN_REUSE or length > len(ids):
            return
        embeds = embeds[:length]
        size = cache_bytes(cache) + embeds.numel() * embeds.element_size()
        if size > self.budget_bytes:
            return
        entry = Entry(ids=ids[:length], embeds=embeds, cache=cache, size=size)
        with self._lock:
            self._entries.append(entry)
            while sum(e.size for e in self._entries) > self.budget_bytes:
                self._entries.pop(0)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.reused_tokens = self.computed_tokens = 0

    def stats(self) -> PrefixStats:
        with self._lock:
            held = sum(e.size for e in self._entries)
            return PrefixStats(self.reused_tokens, self.computed_tokens, len(self._entries), held, self.budget_bytes)
