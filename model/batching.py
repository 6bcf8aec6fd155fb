"""Several prompts per forward: batches through ``generate`` that share their prompts' common starts.

A labelling job asks short questions (a Find per phrase) of many images. Batching them shares
each decoding step's weight reads between the rows — what bounds a decode step on any device —
and lets a GPU's matrix units work on more than one token at a time. The questions about one
image differ only at their end, so the image and the text before the phrase are computed once:
the batch's distinct prefixes are prefilled together (left-padded), their key/value rows are
repeated for every question that shares them, and ``generate`` continues each row from there
with its own ending. A row's layout is ``[pad][prefix][pad][ending]``; positions follow the
attention mask, so the padding in the middle is as invisible as the padding on the left.

Greedy outputs are those of one-at-a-time runs up to rounding (an image is encoded on its own in
any batch, ``encode_image``; positions are the same): identical in fp32, and in bf16 where no two
candidate tokens are closer than the reordered sums' rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import StoppingCriteriaList

from . import compute_thread
from .generation import CancelOnEvent, GenerationSettings
from .kv_cache import kv_cache_bytes
from .processing import EOS_TEXT, DeepseekVL2Processor, Message

# Bounds for ``auto``: past 16 rows a CPU gains nothing more per step, and a GPU's decode step is
# long past its launch-bound regime; a batch this size also keeps Stop within one batch's time.
MAX_AUTO_BATCH = 16
# Fraction of the free memory a batch may plan to use; the rest is headroom for the allocator,
# the vision tower's activations and other programs.
MEMORY_SHARE = 0.5


def generate_batch(
    model,
    processor: DeepseekVL2Processor,
    conversations: Sequence[Sequence[Message]],
    settings: GenerationSettings,
    *,
    system_prompt: str = "",
    cancel_event: threading.Event | None = None,
) -> list[str]:
    """The reply to each conversation (eos removed), generated together in one left-padded batch.

    A set ``cancel_event`` ends the batch within one decoding step; the replies are then partial.
    """
    if not conversations:
        return []
    event = cancel_event or threading.Event()
    special = processor.special

    def run() -> list[str]:
        encoded = [processor.encode_conversation(c, system_prompt) for c in conversations]
        if event.is_set():
            return ["" for _ in conversations]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        shared = shared_prefix_inputs(model, processor, encoded)
        inputs = shared if shared is not None else processor.collate(encoded)
        new_tokens = model.generate(
            **inputs,
            stopping_criteria=StoppingCriteriaList([CancelOnEvent(event)]),
            eos_token_id=special.eos,
            pad_token_id=special.pad,
            use_cache=True,
            **settings.generate_kwargs(),
        )
        return [_reply_text(processor, row.tolist(), special.eos) for row in new_tokens]

    return compute_thread.run(run)


Encoded = tuple[list[int], list[bool], list[Image.Image]]


def _common_length(rows: Sequence[list[int]]) -> int:
    first = rows[0]
    length = min(len(row) for row in rows)
    for row in rows[1:]:
        length = next((i for i in range(length) if row[i] != first[i]), length)
    return length


def shared_prefix_inputs(model, processor: DeepseekVL2Processor, encoded: Sequence[Encoded]) -> dict | None:
    """``generate``'s inputs with each distinct prompt start already in the cache; None if none is shared.

    Rows are grouped by their images (the same image objects, in order); a group's prefix is its
    rows' common start, ending before the last token of the shortest row and after every image
    token (the endings are text only: they are embedded without the vision tower).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, (_, _, images) in enumerate(encoded):
        groups.setdefault(tuple(id(image) for image in images), []).append(row)
    if len(groups) == len(encoded):
        return None  # nothing shared: a plain left-padded batch is the same work
    prefixes: list[Encoded] = []
    group_of_row = [0] * len(encoded)
    lengths: list[int] = []
    for index, rows in enumerate(groups.values()):
        ids = [encoded[row][0] for row in rows]
        length = min(_common_length(ids), min(len(i) for i in ids) - 1)
        if any(any(encoded[row][1][length - 1 :]) for row in rows):
            return None  # an image token at or after the prefix's end
        first = encoded[rows[0]]
        prefixes.append((first[0][:length], first[1][:length], first[2]))
        lengths.append(length)
        for row in rows:
            group_of_row[row] = index
    start = processor.collate(prefixes)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        embeds = model.prepare_inputs_embeds(
            start["input_ids"].to(device), start["pixel_values"], start["images_seq_mask"], start["images_spatial_crop"]
        )
        # All but the prefixes' last token: generate's first forward computes it with the endings.
        cache = model.prefill_cache(embeds, start["attention_mask"].to(device, torch.long), model.prefill_chunk_size)
        rows = torch.tensor(group_of_row, device=device)
        for layer in cache.layers:  # one key/value row per question (GrowingLayer takes the new tensors)
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
    width = start["input_ids"].shape[1]
    endings = [encoded[row][0][lengths[group_of_row[row]] :] for row in range(len(encoded))]
    longest = max(len(ending) for ending in endings)
    pad = processor.special.pad
    input_ids = torch.full((len(encoded), width + longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width + longest), dtype=torch.long)
    for row, ending in enumerate(endings):
        input_ids[row, :width] = start["input_ids"][group_of_row[row]]
        attention_mask[row, :width] = start["attention_mask"][group_of_row[row]]
        input_ids[row, width + longest - len(ending) :] = torch.tensor(ending, dtype=torch.long)
        attention_mask[row, width + longest - len(ending) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache}


def _reply_text(processor: DeepseekVL2Processor, ids: list[int], eos: int) -> str:
    """A row's tokens up to its eos (rows that ended early are padded after it)."""
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return processor.decode(ids).replace(EOS_TEXT, "")


def free_memory_bytes(device: torch.device | str) -> int:
    """What a batch may still allocate on ``device``: the card's free memory, or the host's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 2 * 2**30  # no /proc (macOS): assume a little


def auto_batch_size(
    model, prompt_tokens: int, new_tokens: int, *, free_bytes: int | None = None, limit: int = MAX_AUTO_BATCH
) -> int:
    """Rows per batch that fit in half the free memory: each row's cache plus its prefill activations.

    ``prompt_tokens``: the longest prompt (image tokens included); ``new_tokens``: the reply cap.
    """
    text_config = model.config.text_config
    embeddings = model.get_input_embeddings().weight
    dtype = embeddings.dtype
    element = torch.finfo(dtype).bits // 8
    cache = kv_cache_bytes(text_config, prompt_tokens + new_tokens, element)
    # Prefill holds a few hidden-size activations per prompt token and the widest MLP's intermediate.
    widest = max(text_config.intermediate_size, text_config.hidden_size * 4)
    activations = prompt_tokens * (6 * text_config.hidden_size + widest) * element
    available = free_memory_bytes(embeddings.device) if free_bytes is None else free_bytes
    rows = int(available * MEMORY_SHARE // max(1, cache + activations))
    return max(1, min(limit, rows))
