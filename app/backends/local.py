"""The in-process backend: our DeepSeek-VL2 runtime (``model/``), one generation at a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import torch

from model.batching import auto_batch_size, generate_batch
from model.generation import GenerationSettings, stream_reply
from model.loading import LoadedModel, LoadInfo
from model.processing import Message

from .base import BackendError, BackendInfo, ReplyHandle


def memory_summary(info: LoadInfo) -> str:
    """One line per part ("routed experts 1.25 GB uint8 on cuda:0"), for the header's tooltip."""
    lines = [f"weights {info.total_bytes / 1e9:.2f} GB"]
    for kind, entry in info.parts.items():
        dtypes = "+".join(entry["dtypes"])
        lines.append(f"{kind}: {entry['bytes'] / 1e9:.2f} GB {dtypes} on {', '.join(entry['devices'])}")
    lines += [line for line in (info.placement, info.compute) if line]
    return "\n".join(lines)


OOM_ADVICE = (
    "The model ran out of memory on this request. Try fewer or smaller images, a shorter conversation, "
    "or start the app with --quantization 4bit."
)


class LocalBackend:
    """Runs the model in this process. A lock makes it one lane: requests queue, never overlap."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.lane = threading.Lock()
        info = loaded.info
        context = int(getattr(loaded.model.config.text_config, "max_position_embeddings", 4096))
        self.info = BackendInfo(
            model_id=info.model_id,
            precision=info.quantization or info.dtype.removeprefix("torch."),
            device=info.device,
            context_length=context,
            details=memory_summary(info),
        )

    def reuse_summary(self) -> str:
        """What the runtime reuses across questions (for the header's tooltip)."""
        model = self.loaded.model
        vision, prefixes = model.vision_cache, model.prefix_cache
        return "\n".join(
            (
                vision.stats().summary() if vision is not None else "vision features: not kept (VL2_VISION_CACHE_MB=0)",
                prefixes.stats().summary()
                if prefixes is not None
                else "conversation prefixes: not kept (VL2_PREFIX_CACHE_MB=0)",
            )
        )

    def count_tokens(self, conversation: Sequence[Message], *, system_prompt: str = "") -> int:
        ids, _, _ = self.loaded.processor.encode_conversation(conversation, system_prompt)
        return len(ids)

    def batch_size(self, conversation: Sequence[Message], settings: GenerationSettings) -> int:
        """Rows per batch that fit in half the free memory (``model/batching.py``)."""
        return auto_batch_size(self.loaded.model, self.count_tokens(conversation), settings.max_new_tokens)

    def complete_many(
        self,
        conversations: Sequence[Sequence[Message]],
        settings: GenerationSettings,
        *,
        cancel_event: threading.Event | None = None,
    ) -> list[str]:
        """All replies from one left-padded batch: a decoding step serves every row at once."""
        with self.lane:
            try:
                return generate_batch(
                    self.loaded.model, self.loaded.processor, conversations, settings, cancel_event=cancel_event
                )
            except torch.OutOfMemoryError as exc:
                raise BackendError(
                    OOM_ADVICE + f" For a labelling job, a --batch-size below {len(conversations)}."
                ) from exc
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def stream(
        self,
        conversation: Sequence[Message],
        settings: GenerationSettings,
        *,
        system_prompt: str = "",
        cancel_event: threading.Event | None = None,
    ) -> ReplyHandle:
        event = cancel_event or threading.Event()
        return ReplyHandle(self._deltas(list(conversation), settings, system_prompt, event), event)

    def _deltas(
        self, conversation: list[Message], settings: GenerationSettings, system_prompt: str, event: threading.Event
    ) -> Iterator[str]:
        with self.lane:
            if event.is_set():
                return
            stream = stream_reply(
                self.loaded.model,
                self.loaded.processor,
                conversation,
                settings,
                system_prompt=system_prompt,
                cancel_event=event,
            )
            try:
                yield from stream
            except torch.OutOfMemoryError as exc:
                raise BackendError(OOM_ADVICE) from exc
            finally:
                # Reached on normal end, on error, and when the consumer stops early (Stop button,
                # closed tab): the generation must end before the lane is released.
                if stream.running:
                    stream.cancel()
                stream.join()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
