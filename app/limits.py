"""Limits that protect the host; each can be changed with an environment variable."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from model.images import DEFAULT_MAX_PIXELS


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value and value.strip().isdigit() else default


@dataclass(frozen=True)
class Limits:
    max_upload_mb: int = field(default_factory=lambda: _env_int("VL2_MAX_UPLOAD_MB", 50))
    max_pixels: int = field(default_factory=lambda: _env_int("VL2_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    max_images_per_turn: int = field(default_factory=lambda: _env_int("VL2_MAX_IMAGES_PER_TURN", 8))
    max_prompt_chars: int = field(default_factory=lambda: _env_int("VL2_MAX_PROMPT_CHARS", 8000))
    max_new_tokens: int = field(default_factory=lambda: _env_int("VL2_MAX_NEW_TOKENS", 2048))
    session_ttl_seconds: int = field(default_factory=lambda: _env_int("VL2_SESSION_TTL", 2 * 3600))
    queue_size: int = field(default_factory=lambda: _env_int("VL2_QUEUE_SIZE", 32))

    def clamp_new_tokens(self, value: int) -> int:
        return max(1, min(int(value), self.max_new_tokens))
