"""A remote backend: an OpenAI-compatible serving engine (vLLM, SGLang) running DeepSeek-VL2.

The reply is requested from ``POST {base_url}/chat/completions`` with ``stream: true`` and read as
Server-Sent Events. The request starts lazily, on the first ``next()`` of the handle's deltas, so
``stream()`` returns at once and every failure (server down, HTTP error, broken stream) surfaces
where the caller iterates, as a :class:`BackendError` with a message meant for the user.

Stopping: the cancel event is checked after every line the server sends; when it is set — or
when the consumer closes the deltas generator — the HTTP response is closed. Closing the
connection is what makes vLLM/SGLang abort the request and free its slot. A server that sends
nothing at all (e.g. a request queued behind others) is noticed at its next line or at the read
timeout.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import httpx
from PIL import Image

from model.generation import GenerationSettings
from model.image_processing import plan_tiles
from model.images import canonicalize
from model.processing import EOS_TEXT, IMAGE_TAG, Message

from .base import BackendError, BackendInfo, ConcurrentCompletions, ReplyHandle

ERROR_DETAIL_CHARS = 300
TEXT_TOKENS_PER_MESSAGE = 8  # role markers, separators, BOS/EOS — rounded up
_IMAGE_TAG_LINE = re.compile(re.escape(IMAGE_TAG) + r"[ \t]*\n?")
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def start_hint(model: str) -> str:
    return (
        f'vllm serve {model} --hf-overrides \'{{"architectures": ["DeepseekVLV2ForCausalLM"]}}\' '
        f"or python -m sglang.launch_server --model-path {model}"
    )


def estimate_text_tokens(text: str) -> int:
    """A deliberately high token count for text: ~3 ASCII characters per token, 1 per other character.

    DeepSeek's tokenizer averages about 4 characters per English token and at least one token per
    two CJK characters, so this over-counts; over-counting only trims history a little early.
    """
    text = text.replace(IMAGE_TAG, "")
    ascii_chars = sum(1 for ch in text if ord(ch) < 128)
    return ascii_chars // 3 + (len(text) - ascii_chars)


def image_data_url(image: Image.Image) -> str:
    """The image as a lossless PNG ``data:`` URL (RGB, like the in-process preprocessing)."""
    if image.mode != "RGB":
        image = canonicalize(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def strip_image_tags(text: str) -> str:
    """Remove ``<image>`` placeholders (and the newline after each): the engine inserts its own."""
    return _IMAGE_TAG_LINE.sub("", text)


def build_messages(conversation: Sequence[Message], system_prompt: str = "") -> list[dict[str, Any]]:
    """The conversation in OpenAI chat format: images first in each user turn, then the text."""
    messages: list[dict[str, Any]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    for message in conversation:
        if message.role == "assistant":
            if message.images:
                raise BackendError("An assistant turn cannot carry images.")
            messages.append({"role": "assistant", "content": message.text.strip()})
            continue
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in message.images
        ]
        content.append({"type": "text", "text": strip_image_tags(message.text).strip()})
        messages.append({"role": "user", "content": content})
    return messages


def sampling_params(settings: GenerationSettings) -> dict[str, Any]:
    """GenerationSettings as OpenAI fields plus the vLLM/SGLang extras (temperature 0 = greedy)."""
    greedy = settings.temperature <= 0
    params: dict[str, Any] = {
        "max_tokens": settings.max_new_tokens,
        "temperature": 0.0 if greedy else settings.temperature,
        "top_p": 1.0 if greedy else settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
        # Grounding tags (<|ref|>, <|det|>, …) are special tokens: the engine must keep them verbatim.
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
    }
    if settings.min_new_tokens > 0:
        params["min_tokens"] = settings.min_new_tokens
    if settings.seed is not None:
        params["seed"] = settings.seed
    return params


def error_detail(payload: Any, raw: str = "") -> str:
    """The server's error message from ``{"error": {"message"}}``, ``{"message"}``, ``{"detail"}`` or text."""
    message: Any = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or payload.get("message") or payload.get("detail")
    text = " ".join(str(message if message else raw).split())
    if len(text) > ERROR_DETAIL_CHARS:
        text = text[: ERROR_DETAIL_CHARS - 1] + "…"
    return text or "(no details)"


def sse_data(lines: Iterable[str]) -> Iterator[str]:
    """The ``data`` of each Server-Sent Event (multi-line data joined with newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):  # comment / keep-alive
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


class _EosFilter:
    """Drops the end-of-sentence marker should an engine emit it; holds back a possible partial one."""

    def __init__(self) -> None:
        self.pending = ""

    def push(self, piece: str) -> str:
        text = (self.pending + piece).replace(EOS_TEXT, "")
        for keep in range(min(len(EOS_TEXT) - 1, len(text)), 0, -1):
            if EOS_TEXT.startswith(text[-keep:]):
                self.pending = text[-keep:]
                return text[:-keep]
        self.pending = ""
        return text

    def flush(self) -> str:
        tail, self.pending = self.pending, ""
        return tail


class OpenAICompatibleBackend(ConcurrentCompletions):
    """Chat completions from a vLLM/SGLang server. Requests run concurrently; the engine batches them."""

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout: float = 600.0,
        context_length: int = 4096,
    ) -> None:
        url = httpx.URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"the server URL must look like http://127.0.0.1:8000/v1, got {base_url!r}")
        self.base_url = str(url)
        self.model = model
        self.endpoint = self.base_url + "/chat/completions"
        self.timeout = timeout
        port = url.port or (443 if url.scheme == "https" else 80)
        host = f"[{url.host}]" if ":" in url.host else url.host
        self.info = BackendInfo(
            model_id=model,
            precision="remote",
            device=f"{host}:{port}",
            context_length=context_length,
            details=f"OpenAI-compatible server at {self.base_url}",
        )
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "EMPTY")
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {key}", "Accept": "text/event-stream"},
            # Read timeout = the longest silence between two lines of the stream (prefill included).
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            # A loopback engine must never be reached through an HTTP(S)_PROXY from the environment.
            trust_env=url.host not in _LOOPBACK_HOSTS,
        )

    def close(self) -> None:
        """Close pooled connections (the backend is not usable afterwards)."""
        self._client.close()

    def count_tokens(self, conversation: Sequence[Message], *, system_prompt: str = "") -> int:
        """Exact image tokens (DeepSeek-VL2 tiling) plus a conservative estimate for the text."""
        images = [image for message in conversation for image in message.images]
        image_tokens = sum(plan_tiles(im.width, im.height, num_images=len(images)).image_tokens for im in images)
        text_tokens = sum(estimate_text_tokens(m.text) + TEXT_TOKENS_PER_MESSAGE for m in conversation)
        if system_prompt:
            text_tokens += estimate_text_tokens(system_prompt) + TEXT_TOKENS_PER_MESSAGE
        return image_tokens + text_tokens

    def request_body(
        self, conversation: Sequence[Message], settings: GenerationSettings, *, system_prompt: str = ""
    ) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": build_messages(conversation, system_prompt),
            "stream": True,
            **sampling_params(settings),
        }

    def stream(
        self,
        conversation: Sequence[Message],
        settings: GenerationSettings,
        *,
        system_prompt: str = "",
        cancel_event: threading.Event | None = None,
    ) -> ReplyHandle:
        """Returns at once; the request (and the image encoding) happen on the first ``next()``."""
        event = cancel_event or threading.Event()
        return ReplyHandle(self._deltas(list(conversation), settings, system_prompt, event), event)

    # -- the request --------------------------------------------------------------------------
    def _deltas(
        self, conversation: list[Message], settings: GenerationSettings, system_prompt: str, event: threading.Event
    ) -> Iterator[str]:
        if event.is_set():
            return
        body = self.request_body(conversation, settings, system_prompt=system_prompt)
        try:
            # Leaving this block — end of stream, cancel, error, or the consumer closing the
            # generator (GeneratorExit at a yield) — closes the response and so the connection.
            with self._client.stream("POST", self.endpoint, json=body) as response:
                if response.status_code >= 400:
                    raise BackendError(self._http_error(response))
                content_type = response.headers.get("content-type", "")
                if content_type.startswith("application/json"):  # the server ignored stream: true
                    text = self._whole_reply(response)
                    if text and not event.is_set():
                        yield text
                    return
                eos = _EosFilter()
                for data in sse_data(self._lines(response, event)):
                    if event.is_set():
                        return
                    if data.strip() == "[DONE]":
                        break
                    piece = eos.push(self._delta_text(data))
                    if piece:
                        yield piece
                tail = eos.flush()
                if tail and not event.is_set():
                    yield tail
        except httpx.ConnectTimeout as exc:
            raise BackendError(self._unreachable("the connection timed out")) from exc
        except httpx.ConnectError as exc:
            raise BackendError(self._unreachable(str(exc) or exc.__class__.__name__)) from exc
        except httpx.ReadTimeout as exc:
            raise BackendError(
                f"The model server at {self.base_url} sent nothing for {self.timeout:g} s and the request was "
                "given up. The engine may be overloaded or stuck; check its log, or raise the timeout."
            ) from exc
        except httpx.TimeoutException as exc:
            raise BackendError(f"The request to the model server at {self.base_url} timed out ({exc}).") from exc
        except httpx.RemoteProtocolError as exc:
            raise BackendError(
                f"The model server at {self.base_url} closed the connection in the middle of the reply "
                f"(did it crash or restart? check its log): {exc}"
            ) from exc
        except httpx.TransportError as exc:
            raise BackendError(
                f"The connection to the model server at {self.base_url} failed: {exc.__class__.__name__}: {exc}"
            ) from exc

    @staticmethod
    def _lines(response: httpx.Response, event: threading.Event) -> Iterator[str]:
        for line in response.iter_lines():
            if event.is_set():  # checked per line, so a cancel is seen even inside a multi-line event
                return
            yield line

    def _unreachable(self, reason: str) -> str:
        return (
            f"Cannot reach the model server at {self.base_url} — is vLLM/SGLang running? "
            f"(start it with: {start_hint(self.model)}; then pass its URL, ending in /v1, as --server-url) "
            f"[{reason}]"
        )

    def _http_error(self, response: httpx.Response) -> str:
        response.read()
        raw = response.text
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        detail = error_detail(payload, raw)
        message = f"The model server at {self.base_url} answered HTTP {response.status_code}: {detail}"
        if response.status_code in (401, 403):
            message += " (check the API key: OPENAI_API_KEY)"
        elif response.status_code == 404:
            message += (
                f" (check that the base URL ends in /v1 and that the server serves the model {self.model!r}; "
                "GET /v1/models lists them)"
            )
        return message

    def _parse(self, data: str) -> Any:
        try:
            return json.loads(data)
        except ValueError as exc:
            snippet = data if len(data) <= 120 else data[:119] + "…"
            raise BackendError(
                f"The model server at {self.base_url} sent a malformed stream event (not JSON): {snippet!r}"
            ) from exc

    def _delta_text(self, data: str) -> str:
        chunk = self._parse(data)
        if not isinstance(chunk, dict):
            raise BackendError(f"The model server at {self.base_url} sent an unexpected stream event: {data[:120]!r}")
        if chunk.get("error") or chunk.get("object") == "error":
            raise BackendError(
                f"The model server at {self.base_url} reported an error mid-reply: {error_detail(chunk, data)}"
            )
        choices = chunk.get("choices") or []  # a usage-only chunk has none
        if not choices or not isinstance(choices[0], dict):
            return ""
        delta = choices[0].get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        return content if isinstance(content, str) else ""

    def _whole_reply(self, response: httpx.Response) -> str:
        response.read()
        payload = self._parse(response.text)
        if isinstance(payload, dict) and (payload.get("error") or payload.get("object") == "error"):
            raise BackendError(
                f"The model server at {self.base_url} reported an error: {error_detail(payload, response.text)}"
            )
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise BackendError(
                f"The model server at {self.base_url} sent a reply without choices[0].message.content."
            ) from exc
        return (content or "").replace(EOS_TEXT, "")
