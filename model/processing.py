"""Conversation → model inputs, exactly as the official DeepSeek-VL2 processor builds them.

Token construction (one sample):

1. ``[bos]``; a non-empty system prompt follows as ``system + "\\n\\n"`` (the template's rendering;
   the official ``conversations=`` path drops system prompts, so the default "" matches it exactly).
   The official prompt path strips the rendered prompt, so a system prompt's leading whitespace is
   dropped and a whitespace-only one counts as none; so here too.
2. Each user turn is rendered ``"<|User|>: " + text + "\\n\\n<|Assistant|>:"``, split on ``<image>``;
   each text piece is encoded on its own (no special tokens added) and every ``<image>`` becomes
   ``211 + 14·nh·(14·nw+1)`` copies of the ``<image>`` id (the model overwrites them).
3. Each assistant turn is its stripped text followed by ``[eos]``; the next user turn follows the
   eos directly.
4. The prompt ends with the tokens of ``"<|Assistant|>:"`` — generation continues from there.

Batches are left-padded with the pad token. Special-token ids always come from the tokenizer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from transformers import BatchFeature

from .image_processing import DeepseekVL2ImageProcessor, ImageProcessorConfig, plan_tiles
from .tokenizer import SpecialTokenIds, load_tokenizer, special_token_ids

IMAGE_TAG = "<image>"
USER_ROLE = "<|User|>"
ASSISTANT_ROLE = "<|Assistant|>"
EOS_TEXT = "<｜end▁of▁sentence｜>"
PROCESSOR_FILES = ["processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@dataclass
class Message:
    """One turn. ``images`` belong to this turn, in the order of the ``<image>`` tags in ``text``."""

    role: Literal["user", "assistant"]
    text: str
    images: list[Image.Image] = field(default_factory=list)


def place_image_tags(text: str, num_images: int) -> str:
    """Make the text carry exactly one ``<image>`` tag per image.

    Text without tags gets one ``<image>\\n`` line per image in front (the README layout); a text
    whose tag count disagrees with its images is a caller error.
    """
    tags = text.count(IMAGE_TAG)
    if tags == num_images:
        return text
    if tags == 0:
        return (IMAGE_TAG + "\n") * num_images + text
    raise ValueError(f"the message has {tags} {IMAGE_TAG} tags but {num_images} images")


def render_prompt(messages: Sequence[Message], system_prompt: str = "") -> str:
    """The conversation as the model reads it (with one ``<image>`` per image), for display and checks."""
    system_prompt = system_prompt.lstrip()  # as the official path's strip of the rendered prompt
    parts = [system_prompt + "\n\n"] if system_prompt else []
    for message in messages:
        if message.role == "user":
            text = place_image_tags(message.text.strip(), len(message.images))
            parts.append(f"{USER_ROLE}: {text}\n\n{ASSISTANT_ROLE}:")
        else:
            # Display form, as the official template shows it; the tokens carry no leading space.
            parts.append(" " + message.text.strip() + EOS_TEXT)
    return "".join(parts)


class DeepseekVL2Processor:
    """Tokenizer + image tiling + the conversation template."""

    def __init__(self, tokenizer, image_processor: DeepseekVL2ImageProcessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or DeepseekVL2ImageProcessor()
        self.special: SpecialTokenIds = special_token_ids(tokenizer)

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | os.PathLike[str]) -> DeepseekVL2Processor:
        """From a checkpoint folder or a hub id (only the small tokenizer/processor files are fetched)."""
        if not os.path.isdir(checkpoint_dir):
            from huggingface_hub import snapshot_download

            checkpoint_dir = snapshot_download(str(checkpoint_dir), allow_patterns=PROCESSOR_FILES)
        config_path = os.path.join(checkpoint_dir, "processor_config.json")
        image_config = None
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                image_config = ImageProcessorConfig.from_dict(json.load(f))
        return cls(load_tokenizer(checkpoint_dir), DeepseekVL2ImageProcessor(image_config))

    # -- one sample --------------------------------------------------------------------------
    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_conversation(
        self, messages: Sequence[Message], system_prompt: str = ""
    ) -> tuple[list[int], list[bool], list[Image.Image]]:
        """Token ids, the image-placeholder mask, and the images in the order they appear."""
        images = [image for m in messages for image in m.images]
        plans = iter(
            plan_tiles(image.width, image.height, num_images=len(images), candidates=self._candidates())
            for image in images
        )
        ids = [self.special.bos]
        mask = [False]
        # The official prompt path strips the rendered prompt: leading whitespace of the system prompt
        # goes, and a whitespace-only one is no system prompt at all.
        system_prompt = system_prompt.lstrip()
        if system_prompt:
            piece = self._encode_text(system_prompt + "\n\n")
            ids += piece
            mask += [False] * len(piece)
        for message in messages:
            if message.role == "assistant":
                if message.images:
                    raise ValueError("assistant turns cannot carry images")
                piece = [*self._encode_text(message.text.strip()), self.special.eos]
                ids += piece
                mask += [False] * len(piece)
                continue
            text = place_image_tags(message.text.strip(), len(message.images))
            pieces = f"{USER_ROLE}: {text}\n\n{ASSISTANT_ROLE}:".split(IMAGE_TAG)
            for index, text_piece in enumerate(pieces):
                encoded = self._encode_text(text_piece)
                ids += encoded
                mask += [False] * len(encoded)
                if index < len(pieces) - 1:
                    count = next(plans).image_tokens
                    ids += [self.special.image] * count
                    mask += [True] * count
        return ids, mask, images

    def _candidates(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(c) for c in self.image_processor.config.candidate_resolutions)

    # -- batch -------------------------------------------------------------------------------
    def __call__(
        self,
        conversations: Sequence[Sequence[Message]] | Sequence[Message],
        system_prompt: str = "",
    ) -> BatchFeature:
        """Model inputs for one conversation or a batch of them (left-padded)."""
        batch = [conversations] if conversations and isinstance(conversations[0], Message) else conversations
        return self.collate([self.encode_conversation(conv, system_prompt) for conv in batch])

    def collate(self, encoded: Sequence[tuple[list[int], list[bool], list[Image.Image]]]) -> BatchFeature:
        """Encoded samples (``encode_conversation``'s triples) as one left-padded batch of model inputs."""
        processed = [self.image_processor(images) if images else None for _, _, images in encoded]
        longest = max(len(ids) for ids, _, _ in encoded)
        tile_size = self.image_processor.config.tile_size
        max_tiles = max([p.pixel_values.shape[0] for p in processed if p is not None] + [1])
        max_images = max([len(p.spatial_crop) for p in processed if p is not None] + [1])

        input_ids = torch.full((len(encoded), longest), self.special.pad, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), longest), dtype=torch.bool)
        images_seq_mask = torch.zeros((len(encoded), longest), dtype=torch.bool)
        pixel_values = torch.zeros((len(encoded), max_tiles, 3, tile_size, tile_size), dtype=torch.float32)
        images_spatial_crop = torch.zeros((len(encoded), max_images, 2), dtype=torch.long)
        for row, ((ids, mask, _), images) in enumerate(zip(encoded, processed, strict=True)):
            start = longest - len(ids)
            input_ids[row, start:] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, start:] = True
            images_seq_mask[row, start:] = torch.tensor(mask, dtype=torch.bool)
            if images is not None:
                pixel_values[row, : images.pixel_values.shape[0]] = images.pixel_values
                images_spatial_crop[row, : len(images.spatial_crop)] = torch.tensor(images.spatial_crop)
        return BatchFeature(
            {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "images_seq_mask": images_seq_mask,
                "pixel_values": pixel_values,
                "images_spatial_crop": images_spatial_crop,
            }
        )

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Decode generated ids; grounding needs the special tags, so they are kept by default."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
