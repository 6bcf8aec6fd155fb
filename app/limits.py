"""Limits that protect the host; each can be changed with an environment variable.

Every request is budgeted as a whole (images, pixels and history across the message *and* its
history), not only each file on its own: one small upload referenced many times must not decode
into gigabytes. Budgets are checked from image headers, before any pixel is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.environment import read_int
from model.images import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, ShapeLimits


@dataclass(frozen=True)
class Limits:
    max_upload_mb: int = field(default_factory=lambda: read_int("VL2_MAX_UPLOAD_MB", 50))
    max_pixels: int = field(default_factory=lambda: read_int("VL2_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    max_side: int = field(default_factory=lambda: read_int("VL2_MAX_SIDE", DEFAULT_MAX_SIDE))
    max_aspect: int = field(default_factory=lambda: read_int("VL2_MAX_ASPECT", DEFAULT_MAX_ASPECT))
    max_images_per_turn: int = field(default_factory=lambda: read_int("VL2_MAX_IMAGES_PER_TURN", 8))
    # One request (a message with its history, or one conversation in the page) as a whole.
    max_images_per_request: int = field(default_factory=lambda: read_int("VL2_MAX_IMAGES_PER_REQUEST", 16))
    max_request_pixels: int = field(default_factory=lambda: read_int("VL2_MAX_REQUEST_PIXELS", 100_000_000))
    # All conversations together (3 GB as RGB at the default): past it, new images wait for others to end.
    max_server_pixels: int = field(default_factory=lambda: read_int("VL2_MAX_SERVER_PIXELS", 1_000_000_000))
    max_history_items: int = field(default_factory=lambda: read_int("VL2_MAX_HISTORY_ITEMS", 64))
    max_prompt_chars: int = field(default_factory=lambda: read_int("VL2_MAX_PROMPT_CHARS", 8000))
    max_new_tokens: int = field(default_factory=lambda: read_int("VL2_MAX_NEW_TOKENS", 2048))
    max_turns: int = field(default_factory=lambda: read_int("VL2_MAX_TURNS", 200))
    max_boxes: int = field(default_factory=lambda: read_int("VL2_MAX_BOXES", 1000))
    max_label_chars: int = field(default_factory=lambda: read_int("VL2_MAX_LABEL_CHARS", 200))
    # Labelling in the page (the Label tab, /label): the command line has no such bound.
    max_label_images: int = field(default_factory=lambda: read_int("VL2_MAX_LABEL_IMAGES", 200))
    max_label_phrases: int = field(default_factory=lambda: read_int("VL2_MAX_LABEL_PHRASES", 8))
    session_ttl_seconds: int = field(default_factory=lambda: read_int("VL2_SESSION_TTL", 2 * 3600))
    queue_size: int = field(default_factory=lambda: read_int("VL2_QUEUE_SIZE", 32))

    @property
    def shape(self) -> ShapeLimits:
        """What one image may measure (pixels, longest side, aspect), for the header checks."""
        return ShapeLimits(self.max_pixels, self.max_side, self.max_aspect)

    def clamp_new_tokens(self, value: int) -> int:
        return max(1, min(int(value), self.max_new_tokens))
