"""Projected tile features of recent images, so an image goes through the vision tower once.

The second question about a photo, every Find in a row, and the whole-image call of
click-to-ground all send the same image again: on a CPU that is seconds of SigLIP per tile. The
key is the image's tiles as the processor made them (the canonical image and its tiling plan, in
the dtype the tower reads), so a different crop, tiling or precision is a different entry. Entries
are evicted least-recently-used beyond a byte budget.

An image's features are computed from its own tiles only (``DeepseekVL2ForCausalLM.encode_image``),
so a feature served from here is bit-identical to computing it again.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .environment import read_float

DEFAULT_MB = 256  # about 40 seven-tile images of Tiny in fp32 (a tile is 196 × 1,280 values)
GPU_DEFAULT_MB = 64  # on a GPU the features hold device memory the placement plan did not count
ENV = "VL2_VISION_CACHE_MB"  # 0 turns the cache off


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    entries: int
    bytes_held: int
    budget_bytes: int

    def summary(self) -> str:
        return (
            f"vision features: {self.hits} reused, {self.misses} computed; "
            f"{self.entries} images, {self.bytes_held / 2**20:.1f} of {self.budget_bytes / 2**20:.0f} MiB held"
        )


def tiles_key(tiles: torch.Tensor, grid: tuple[int, int]) -> str:
    """A digest of one image's tiles (their values, shape and dtype) and its tile grid."""
    data = tiles.detach().contiguous()
    if data.device.type != "cpu":
        data = data.cpu()
    digest = hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=20)
    digest.update(f"{tuple(data.shape)}|{data.dtype}|{grid}".encode())
    return digest.hexdigest()


class VisionFeatureCache:
    """Least-recently-used map from :func:`tiles_key` to projected features, within ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_env(cls, *, on_gpu: bool = False) -> VisionFeatureCache | None:
        """The cache ``VL2_VISION_CACHE_MB`` asks for (else the default for the device); None when it is 0."""
        megabytes = read_float(ENV, GPU_DEFAULT_MB if on_gpu else DEFAULT_MB)
        return cls(int(megabytes * 2**20)) if megabytes > 0 else None

    def get(self, key: str) -> torch.Tensor | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if size > self.budget_bytes:
            return  # bigger than the whole budget: it would only push everything else out
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._entries[key] = features
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()

    def clear(self) -> None:
        """Forget every entry, and start counting hits and misses again."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.misses = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, len(self._entries), self._bytes, self.budget_bytes)
