"""The OpenAI-compatible backend against a fake vLLM-style server on 127.0.0.1 (SSE over chunked HTTP/1.1)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from app.backends.base import BackendError, ReplyHandle
from app.backends.openai_compat import OpenAICompatibleBackend, estimate_text_tokens, sse_data
from model.generation import GenerationSettings
from model.image_processing import plan_tiles
from model.processing import EOS_TEXT, Message

WAIT = 5.0  # upper bound for every wait on the server; nothing sleeps
MODEL = "deepseek-ai/deepseek-vl2-tiny"
GROUNDING_PIECES = [
    "<|ref|>",
    "cat",
    "<|/ref|><|det|>[[1, ",
    "2, 3, 4]]",
    "<|/det|>",
    " sits on",
    " the mat.",
]


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> dict:
    delta: dict = {}
    if role is not None:
        delta["role"] = role
    if content is not None or role is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@dataclass
class FakeEngine:
    """Records request bodies; answers each with ``respond(handler, body)``."""

    url: str = ""
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    request_seen: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)  # unexpected failures inside the handler
    respond: Callable[[Handler, dict], None] | None = None

    def stream_events(self, events: list[str]) -> Callable[[Handler, dict], None]:
        def respond(handler: Handler, body: dict) -> None:
            handler.start_sse()
            for event in events:
                handler.write_chunk(event)
            handler.end_chunks()

        return respond


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # the client hung up (a cancel, an error reply left unread): expected
            pass
        except Exception as exc:
            self.server.engine.errors.append(exc)
            raise

    def do_POST(self) -> None:
        engine = self.server.engine
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        engine.bodies.append(body)
        engine.headers.append(dict(self.headers))
        engine.request_seen.set()
        if self.path != "/v1/chat/completions":
            self.send_json(404, {"error": {"message": f"no route {self.path}"}})
            return
        assert engine.respond is not None
        engine.respond(self, body)

    def send_json(self, status: int, payload: dict | str) -> None:
        data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if isinstance(payload, dict) else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def start_sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def write_chunk(self, text: str) -> None:
        data = text.encode()
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    engine: FakeEngine


@pytest.fixture
def engine() -> Iterator[FakeEngine]:
    # The listening socket exists once the constructor returns, so the server is ready for connections.
    server = _Server(("127.0.0.1", 0), Handler)
    server.engine = FakeEngine(url=f"http://127.0.0.1:{server.server_address[1]}/v1")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.engine
    finally:
        server.engine.release.set()  # let any waiting handler finish
        server.shutdown()
        server.server_close()
        thread.join(WAIT)
    assert server.engine.errors == []


@pytest.fixture
def backend(engine: FakeEngine) -> Iterator[OpenAICompatibleBackend]:
    backend = OpenAICompatibleBackend(engine.url, model=MODEL, api_key="test-key", timeout=WAIT)
    try:
        yield backend
    finally:
        backend.close()


def user(text: str, *images: Image.Image) -> Message:
    return Message("user", text, list(images))


def greedy(max_new_tokens: int = 64) -> GenerationSettings:
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0)


# -- streaming --------------------------------------------------------------------------------------------------


def test_deltas_arrive_in_order_and_concatenate_to_the_script(engine, backend):
    events = [
        sse(chunk("", role="assistant")),
        ": keep-alive comment\n\n",
        *(sse(chunk(piece)) for piece in GROUNDING_PIECES[:3]),
        sse(chunk(None)),  # content null: skipped
        "data:" + json.dumps(chunk(GROUNDING_PIECES[3])) + "\n\n",  # no space after the colon
        *(sse(chunk(piece)) for piece in GROUNDING_PIECES[4:]),
        sse(chunk(finish="stop")),
        sse({"id": "chatcmpl-1", "choices": [], "usage": {"completion_tokens": 9}}),  # usage-only chunk
        sse("[DONE]"),
    ]
    engine.respond = engine.stream_events(events)
    handle = backend.stream([user("<image>\nFind the cat.", Image.new("RGB", (40, 30)))], greedy())
    assert isinstance(handle, ReplyHandle)
    pieces = list(handle)
    assert pieces == GROUNDING_PIECES
    assert "".join(pieces) == "<|ref|>cat<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|> sits on the mat."


def test_stream_is_lazy_the_request_starts_on_first_iteration(engine, backend):
    engine.respond = engine.stream_events([sse(chunk("Hi.")), sse("[DONE]")])
    handle = backend.stream([user("Hello")], greedy())
    assert not engine.request_seen.is_set()  # stream() did not even send the request
    assert next(iter(handle)) == "Hi."
    assert engine.request_seen.is_set()
    assert list(handle) == []


def test_end_of_sentence_marker_is_dropped_even_when_split(engine, backend):
    half = len(EOS_TEXT) // 2
    events = [sse(chunk("Done")), sse(chunk(".<｜end")), sse(chunk(EOS_TEXT[len("<｜end") :])), sse("[DONE]")]
    engine.respond = engine.stream_events(events)
    assert "".join(backend.stream([user("Go")], greedy())) == "Done."
    engine.respond = engine.stream_events([sse(chunk("A<" + EOS_TEXT[1:half])), sse("[DONE]")])
    # a tail that only looks like the start of the marker is released at the end
    assert "".join(backend.stream([user("Go")], greedy())) == "A<" + EOS_TEXT[1:half]


def test_a_server_that_ignores_stream_true_still_gives_the_reply(engine, backend):
    reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole reply."}}]}
    engine.respond = lambda handler, body: handler.send_json(200, reply)
    assert list(backend.stream([user("Hi")], greedy())) == ["Whole reply."]


def test_sse_parser_joins_multiline_data_and_ignores_other_fields():
    lines = ["event: message", "id: 7", "data: a", "data: b", "", ": ping", "", "data: c"]
    assert list(sse_data(lines)) == ["a\nb", "c"]


# -- the request ------------------------------------------------------------------------------------------------


def decode_png(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(url[len(prefix) :], validate=True)))
    assert image.format == "PNG"
    return image


def test_request_body_carries_images_text_history_and_sampling(engine, backend):
    engine.respond = engine.stream_events([sse(chunk("ok")), sse("[DONE]")])
    first = Image.new("RGB", (64, 48), (200, 10, 10))
    second = Image.new("RGBA", (30, 90), (0, 0, 255, 128))
    conversation = [
        user("<image>\n<image>\nCompare these.", first, second),
        Message("assistant", "The <|ref|>left one<|/ref|><|det|>[[0, 0, 500, 999]]<|/det|> is red.\n"),
        user("<|grounding|>And now?"),
    ]
    settings = GenerationSettings(max_new_tokens=77, temperature=0.0, top_p=0.5, repetition_penalty=1.05)
    assert list(backend.stream(conversation, settings, system_prompt="Be brief.")) == ["ok"]

    (body,) = engine.bodies
    assert engine.headers[0]["Authorization"] == "Bearer test-key"
    assert body["model"] == MODEL
    assert body["stream"] is True
    assert body["max_tokens"] == 77
    assert body["temperature"] == 0
    assert body["top_p"] == 1.0  # greedy: nucleus sampling is off
    assert body["repetition_penalty"] == 1.05
    assert body["skip_special_tokens"] is False
    assert body["spaces_between_special_tokens"] is False

    system, first_user, assistant, second_user = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert first_user["role"] == "user"
    image_parts, text_part = first_user["content"][:2], first_user["content"][2]
    assert [part["type"] for part in image_parts] == ["image_url", "image_url"]
    decoded = [decode_png(part["image_url"]["url"]) for part in image_parts]
    assert [im.size for im in decoded] == [first.size, second.size]
    assert decoded[0].convert("RGB").getpixel((3, 3)) == (200, 10, 10)
    assert text_part == {"type": "text", "text": "Compare these."}
    assert "<image>" not in json.dumps(body["messages"])
    assert assistant == {
        "role": "assistant",
        "content": "The <|ref|>left one<|/ref|><|det|>[[0, 0, 500, 999]]<|/det|> is red.",
    }
    assert second_user == {"role": "user", "content": [{"type": "text", "text": "<|grounding|>And now?"}]}


def test_sampling_settings_and_default_api_key(engine, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    backend = OpenAICompatibleBackend(engine.url, model=MODEL, timeout=WAIT)
    engine.respond = engine.stream_events([sse(chunk("ok")), sse("[DONE]")])
    settings = GenerationSettings(max_new_tokens=12, temperature=0.7, top_p=0.8, min_new_tokens=3, seed=5)
    try:
        assert "".join(backend.stream([user("Hi")], settings)) == "ok"
    finally:
        backend.close()
    (body,) = engine.bodies
    assert engine.headers[0]["Authorization"] == "Bearer from-env"
    assert "system" not in [m["role"] for m in body["messages"]]  # no system prompt, no system message
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (12, 0.7, 0.8)
    assert (body["min_tokens"], body["seed"], body["repetition_penalty"]) == (3, 5, 1.1)


def test_info_names_the_model_and_the_server():
    backend = OpenAICompatibleBackend("http://127.0.0.1:8123/v1/", model=MODEL, context_length=8192)
    try:
        assert backend.info.model_id == MODEL
        assert backend.info.precision == "remote"
        assert backend.info.device == "127.0.0.1:8123"
        assert backend.info.context_length == 8192
        assert backend.endpoint == "http://127.0.0.1:8123/v1/chat/completions"
    finally:
        backend.close()
    with pytest.raises(ValueError, match="server URL"):
        OpenAICompatibleBackend("127.0.0.1:8000", model=MODEL)


# -- stopping ---------------------------------------------------------------------------------------------------


def endless_after_release(engine: FakeEngine) -> Callable[[Handler, dict], None]:
    """One chunk, then (once released) chunks until a write fails: that failure is the client hanging up."""

    def respond(handler: Handler, body: dict) -> None:
        handler.start_sse()
        handler.write_chunk(sse(chunk("first")))
        if not engine.release.wait(WAIT):
            return
        try:
            for _ in range(100_000):  # bounded: a client that never hangs up ends the test as a failure
                handler.write_chunk(sse(chunk(" more")))
        except OSError:  # BrokenPipeError / ConnectionResetError: the client closed the connection
            engine.disconnected.set()

    return respond


def test_cancel_mid_stream_closes_the_connection(engine, backend):
    engine.respond = endless_after_release(engine)
    cancel = threading.Event()
    handle = backend.stream([user("Count forever")], greedy(), cancel_event=cancel)
    deltas = iter(handle)
    assert next(deltas) == "first"
    handle.cancel()
    assert cancel.is_set()  # the caller's event is the handle's event
    engine.release.set()
    assert list(deltas) == []  # nothing after the cancel
    assert engine.disconnected.wait(WAIT), "the server never saw the client hang up"


def test_consumer_closing_early_closes_the_connection(engine, backend):
    engine.respond = endless_after_release(engine)
    handle = backend.stream([user("Count forever")], greedy())
    assert next(iter(handle)) == "first"
    handle.close()  # e.g. the browser tab went away
    engine.release.set()
    assert engine.disconnected.wait(WAIT), "the server never saw the client hang up"


def test_cancel_before_iterating_sends_nothing(engine, backend):
    cancel = threading.Event()
    cancel.set()
    assert list(backend.stream([user("Hi")], greedy(), cancel_event=cancel)) == []
    assert engine.bodies == []


# -- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"error": {"message": "CUDA out of memory in the engine", "type": "InternalServerError"}}, "CUDA out of"),
        ({"object": "error", "message": "engine dead", "code": 500}, "engine dead"),
        ("Internal Server Error: traceback " + "x" * 1000, "Internal Server Error"),
    ],
)
def test_http_500_becomes_a_backend_error_with_the_server_message(engine, backend, payload, expected):
    engine.respond = lambda handler, body: handler.send_json(500, payload)
    with pytest.raises(BackendError, match="HTTP 500") as caught:
        list(backend.stream([user("Hi")], greedy()))
    assert expected in str(caught.value)
    assert len(str(caught.value)) < 500  # long bodies are truncated


def test_http_400_context_overflow_keeps_the_message(engine, backend):
    message = "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens."
    engine.respond = lambda handler, body: handler.send_json(400, {"error": {"message": message, "code": 400}})
    with pytest.raises(BackendError, match="HTTP 400") as caught:
        list(backend.stream([user("Hi")], greedy()))
    assert message in str(caught.value)


def test_wrong_path_hints_at_the_base_url(engine):
    backend = OpenAICompatibleBackend(engine.url.removesuffix("/v1"), model=MODEL, timeout=WAIT)
    try:
        with pytest.raises(BackendError, match="HTTP 404") as caught:
            list(backend.stream([user("Hi")], greedy()))
    finally:
        backend.close()
    assert "/v1" in str(caught.value)


def test_unreachable_server_names_the_url():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    backend = OpenAICompatibleBackend(url, model=MODEL, timeout=WAIT)
    handle = backend.stream([user("Hi")], greedy())  # does not raise: the request is lazy
    try:
        with pytest.raises(BackendError, match="Cannot reach the model server") as caught:
            list(handle)
    finally:
        backend.close()
    assert url in str(caught.value)
    assert "vLLM/SGLang" in str(caught.value)


def test_malformed_event_json_is_a_clear_error(engine, backend):
    engine.respond = engine.stream_events([sse(chunk("ok")), "data: {not json\n\n", sse("[DONE]")])
    deltas = iter(backend.stream([user("Hi")], greedy()))
    assert next(deltas) == "ok"
    with pytest.raises(BackendError, match="malformed stream event"):
        next(deltas)


def test_error_event_mid_stream_is_a_backend_error(engine, backend):
    error = {"error": {"message": "request aborted by the scheduler", "code": 500}}
    engine.respond = engine.stream_events([sse(chunk("par")), sse(error)])
    deltas = iter(backend.stream([user("Hi")], greedy()))
    assert next(deltas) == "par"
    with pytest.raises(BackendError, match="request aborted by the scheduler"):
        next(deltas)


def test_server_going_away_mid_reply_is_a_backend_error(engine, backend):
    def respond(handler: Handler, body: dict) -> None:
        handler.start_sse()
        handler.write_chunk(sse(chunk("par")))
        handler.close_connection = True  # no terminating chunk: the body is cut short

    engine.respond = respond
    with pytest.raises(BackendError, match="closed the connection"):
        list(backend.stream([user("Hi")], greedy()))


def test_read_timeout_is_a_backend_error(engine):
    def respond(handler: Handler, body: dict) -> None:
        handler.start_sse()
        engine.release.wait(WAIT)  # silent until the test is over

    engine.respond = respond
    backend = OpenAICompatibleBackend(engine.url, model=MODEL, timeout=0.3)
    try:
        with pytest.raises(BackendError, match=r"sent nothing for 0\.3 s"):
            list(backend.stream([user("Hi")], greedy()))
    finally:
        engine.release.set()
        backend.close()


# -- token counting ---------------------------------------------------------------------------------------------


def test_count_tokens_is_at_least_the_exact_image_tokens():
    backend = OpenAICompatibleBackend("http://127.0.0.1:9/v1", model=MODEL)
    try:
        one = [user("<image>\nDescribe.", Image.new("RGB", (1000, 600)))]
        exact = plan_tiles(1000, 600, num_images=1).image_tokens
        assert backend.count_tokens(one) >= exact + estimate_text_tokens("Describe.")
        assert backend.count_tokens(one, system_prompt="Be brief.") > backend.count_tokens(one)

        sizes = [(1000, 600), (300, 900), (640, 480)]  # three images: tiling is off for all of them
        many = [user("Look.", *(Image.new("RGB", size) for size in sizes)), Message("assistant", "Ok."), user("?")]
        exact_many = sum(plan_tiles(w, h, num_images=3).image_tokens for w, h in sizes)
        assert backend.count_tokens(many) >= exact_many
        assert backend.count_tokens(many) < exact_many + 100
    finally:
        backend.close()


def test_text_estimate_is_conservative_for_english_and_cjk():
    assert estimate_text_tokens("<image>") == 0
    assert estimate_text_tokens("The quick brown fox jumps over the lazy dog.") >= 10
    assert estimate_text_tokens("这是一只猫") == 5


# -- labelling: many requests in flight -------------------------------------------------------------------------


def test_complete_many_keeps_every_request_in_flight_at_once(engine, backend):
    """A serving engine batches what is in flight together: all N requests must be open at the same time."""
    count = 4
    together = threading.Barrier(count, timeout=WAIT)  # broken (an error) unless all 4 arrive before any answers

    def respond(handler: Handler, body: dict) -> None:
        together.wait()
        text = next(part["text"] for part in body["messages"][-1]["content"] if part["type"] == "text")
        handler.start_sse()
        handler.write_chunk(sse(chunk(f"echo {text}")))
        handler.write_chunk(sse("[DONE]"))
        handler.end_chunks()

    engine.respond = respond
    conversations = [[user(f"question {index}", Image.new("RGB", (8, 8)))] for index in range(count)]
    replies = backend.complete_many(conversations, greedy())
    assert replies == [f"echo question {index}" for index in range(count)]
    assert len(engine.bodies) == count
    assert backend.batch_size(conversations[0], greedy()) == backend.in_flight
