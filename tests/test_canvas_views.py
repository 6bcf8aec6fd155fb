"""The image workspace as data: the canvas value, the box panel, the highlighted answer, the served
copies, and what a streamed reply actually sends to the browser (read off the raw queue messages)."""

from __future__ import annotations

import copy
import html
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from gradio_client.utils import apply_diff
from PIL import Image

import app.ui as ui
from app import served
from app.backends.base import BackendInfo, ReplyHandle
from app.backends.loading import BackgroundLoadedBackend
from app.backends.scripted import ScriptedBackend, split_into_pieces
from app.canvas import canvas_value
from app.controller import Controller
from app.examples import EXAMPLES
from app.modes import Mode
from app.session import Session
from app.views import answer_html, box_panel_html
from model.generation import GenerationSettings

from .app_support import find_reply, running_app, solid_image
from .http_client import REQUEST_SECONDS, send_messages, upload

# The page's outputs, in the order ui.build_demo lists them (views, then the prompt box and the state).
CHAT, CANVAS, PANEL, RAW, NOTICE, KEEP, LABEL_FILTER, COUNTS, HEADER, PROMPT, STATE = range(11)


ROUNDING = 0.051  # the canvas sends pixels to 0.1


def fake_url(entry) -> str:
    return f"view/{entry.key}.png"


def ask(session: Session, reply: str, *, images: dict[str, tuple[int, int]] | None = None):
    """One finished turn: its new images (grey, of the given sizes) and the model's reply, parsed."""
    for name, size in (images or {}).items():
        session.add_image(Image.new("RGB", size, (128, 128, 128)), name)
    turn = session.start_turn("q", "q", Mode.GROUNDED)
    session.update_reply(turn, reply, final=True)
    return turn


def two_images() -> Session:
    """Boxes 1 and 2 on img1 (640×480), box 3 on img2 (300×500)."""
    session = Session()
    ask(
        session,
        "A " + find_reply("cat", (100, 200, 300, 400)) + " and a " + find_reply("dog", (500, 0, 999, 999)),
        images={"room.png": (640, 480)},
    )
    ask(session, find_reply("apple", (0, 0, 499, 499)), images={"fruit.png": (300, 500)})
    return session


# -- 1. canvas_value ---------------------------------------------------------------------------
def test_canvas_draws_the_active_images_boxes_with_their_conversation_wide_numbers():
    session = two_images()
    assert session.active_image == "img2"  # the last turn's image
    value = canvas_value(session, fake_url)
    assert value["image"] == {"key": "img2", "name": "fruit.png", "url": "view/img2.png", "width": 300, "height": 500}
    (apple,) = value["boxes"]  # boxes 1 and 2 belong to the other image: not drawn here
    (box,) = session.turns[1].boxes
    assert apple["n"] == 3 and apple["label"] == "apple" and apple["norm"] == [0, 0, 499, 499]
    assert apple["color"] == session.colors.hex("apple")
    assert apple["xyxy"] == pytest.approx(list(box.xyxy), abs=ROUNDING)
    assert apple["xyxy"] == pytest.approx([0, 0, 499 / 999 * 300, 499 / 999 * 500], abs=ROUNDING)
    assert apple["selected"] is False
    assert value["images"] == [
        {"key": "img1", "name": "room.png", "url": "view/img1.png", "active": False},
        {"key": "img2", "name": "fruit.png", "url": "view/img2.png", "active": True},
    ]
    assert value["examples"] == [] and value["pins"] == []
    json.dumps(value)  # it goes to the browser as JSON

    assert session.select_number(2)  # selecting a box shows its image
    value = canvas_value(session, fake_url)
    assert value["image"]["key"] == "img1" and (value["image"]["width"], value["image"]["height"]) == (640, 480)
    assert [(b["n"], b["label"], b["selected"]) for b in value["boxes"]] == [(1, "cat", False), (2, "dog", True)]
    cat, dog = value["boxes"]
    assert cat["xyxy"] == pytest.approx(
        [100 / 999 * 640, 200 / 999 * 480, 300 / 999 * 640, 400 / 999 * 480], abs=ROUNDING
    )
    assert dog["norm"] == [500, 0, 999, 999] and dog["xyxy"] == pytest.approx(
        [500 / 999 * 640, 0, 640, 480], abs=ROUNDING
    )
    assert cat["color"] == session.colors.hex("cat") != dog["color"] == session.colors.hex("dog")
    assert [i["active"] for i in value["images"]] == [True, False]

    session.hidden_labels = {"cat"}  # hidden: not drawn, and the others keep their numbers
    assert [(b["n"], b["label"]) for b in canvas_value(session, fake_url)["boxes"]] == [(2, "dog")]


def test_canvas_coordinates_are_original_pixels_even_when_the_served_copy_is_smaller():
    session = Session()
    ask(session, find_reply("ship", (250, 500, 750, 999)), images={"wide.png": (4096, 1024)})
    assert session.images["img1"].display.size == (2048, 512)  # the browser gets a smaller copy...
    session.add_pin("img1", (3000.04, 900.06))
    value = canvas_value(session, fake_url)
    assert (value["image"]["width"], value["image"]["height"]) == (4096, 1024)  # ...drawn in the original's pixels
    (ship,) = value["boxes"]
    assert ship["xyxy"] == pytest.approx([250 / 999 * 4096, 500 / 999 * 1024, 750 / 999 * 4096, 1024], abs=ROUNDING)
    assert value["pins"] == [[3000.0, 900.1]]


def test_the_landing_canvas_offers_the_examples_until_an_image_arrives():
    value = canvas_value(Session(), fake_url, EXAMPLES)
    assert value["image"] is None and value["boxes"] == [] and value["images"] == [] and value["pins"] == []
    assert [e["index"] for e in value["examples"]] == list(range(len(EXAMPLES)))
    for shown, example in zip(value["examples"], EXAMPLES, strict=True):
        assert (shown["label"], shown["text"], shown["mode"]) == (example.label, example.text, example.mode.value)
        assert shown["thumb"].startswith("gradio_api/file=")
        assert unquote(shown["thumb"].removeprefix("gradio_api/file=")) == example.files[0]
        assert Path(example.files[0]).is_file()
    assert canvas_value(two_images(), fake_url, EXAMPLES)["examples"] == []


# -- 2. EXIF -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("stored", "canonical", "served_size"),
    [((300, 200), (200, 300), (200, 300)), ((2400, 1200), (1200, 2400), (1024, 2048))],
)
def test_an_exif_rotated_photo_is_drawn_and_served_upright(tmp_path, stored, canonical, served_size):
    backend = ScriptedBackend(find_reply("cat", (0, 0, 999, 999)))
    controller, session = Controller(backend, image_dir=tmp_path / "images"), Session()
    path = solid_image(tmp_path / "phone.jpg", stored, exif_orientation=6)
    with Image.open(path) as raw:
        assert raw.size == stored  # the file's pixels lie on their side
    turn, _notes = controller.accept(session, "cat", [path], Mode.FIND)
    list(controller.run_turn(session, turn, GenerationSettings(max_new_tokens=64)))
    try:
        value = canvas_value(session, lambda entry: controller.view_url(session, entry))
        width, height = canonical
        assert (value["image"]["width"], value["image"]["height"]) == canonical
        (box,) = value["boxes"]  # the whole image, in the same (upright) pixels
        assert box["xyxy"] == pytest.approx([0, 0, width, height], abs=ROUNDING)
        assert value["image"]["url"].startswith("gradio_api/file=")
        copy = Path(unquote(value["image"]["url"].removeprefix("gradio_api/file=")))
        assert copy.parent == served.views_folder(session.session_id)
        with Image.open(copy) as shown:
            assert shown.size == served_size
            assert shown.width * height == shown.height * width  # the same aspect as the canvas's size
            assert shown.getexif().get(0x0112) in (None, 1)  # no tag for the browser to rotate it again by
    finally:
        controller.forget(session)


# -- 3. the box panel ------------------------------------------------------------------------------
class Rows(HTMLParser):
    """The panel's rows: their attributes and the text of each cell (character references resolved)."""

    def __init__(self, markup: str) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[tuple[dict, list[str]]] = []
        self.tags: list[str] = []
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "tr" and "data-box-index" in dict(attrs):
            self.rows.append((dict(attrs), []))
        elif tag == "td" and self.rows:
            self.rows[-1][1].append("")

    def handle_data(self, data):
        if self.rows and self.rows[-1][1]:
            self.rows[-1][1][-1] += data


def test_the_panel_lists_every_box_once_with_escaped_labels():
    evil, link = "<img src=x onerror=alert(1)>", "[x](http://e)"
    session = Session()
    ask(
        session,
        find_reply(evil, (0, 0, 100, 100)) + find_reply(link, (200, 200, 300, 300)),
        images={"a.png": (100, 100)},
    )
    ask(session, find_reply("cat", (10, 20, 30, 40)), images={"b.png": (999, 999)})
    session.hidden_labels = {"cat"}
    assert session.select_number(2)
    markup = box_panel_html(session)
    assert "<img" not in markup.lower() and "<a" not in markup.lower()
    parsed = Rows(markup)
    assert set(parsed.tags) <= {"table", "thead", "tbody", "tr", "th", "td", "span"}  # nothing a label brought
    assert [attrs["data-box-index"] for attrs, _cells in parsed.rows] == ["1", "2", "3"]
    labels = [cells[1] for _attrs, cells in parsed.rows]
    assert labels == [evil, link, "cat (hidden)"]  # shown as the very characters
    assert [cells[0] for _attrs, cells in parsed.rows] == ["1", "2", "3"]
    assert [cells[2] for _attrs, cells in parsed.rows] == ["1: a.png", "1: a.png", "2: b.png"]
    assert [cells[3] for _attrs, cells in parsed.rows][2] == "10, 20, 30, 40"  # pixels of b.png (999×999)
    classes = [attrs["class"].split() for attrs, _cells in parsed.rows]
    assert classes == [[], ["selected"], ["hidden-label"]]
    assert [attrs["aria-selected"] for attrs, _cells in parsed.rows] == ["false", "true", "false"]


def test_an_empty_panel_says_what_will_be_there():
    assert "data-box-index" not in box_panel_html(Session())


# -- 4. the answer's highlights ----------------------------------------------------------------------
MARK = re.compile(r'<mark(?: class="vl2-ref vl2-box-(\d+)")? style="([^"]*)">(.*?)</mark>')


def marks(markup: str) -> list[tuple[int | None, dict[str, str], str]]:
    found = []
    for number, style, text in MARK.findall(markup):
        rules = dict(rule.split(":", 1) for rule in style.split(";"))
        found.append((int(number) if number else None, rules, html.unescape(text)))
    return found


def test_each_phrase_is_marked_with_its_boxs_number_across_turns():
    session = Session()
    first = ask(
        session,
        "The " + find_reply("cat", (0, 0, 10, 10)) + " sits by " + find_reply("the dog", (20, 20, 30, 30)) + ".",
        images={"a.png": (100, 100)},
    )
    second = ask(session, "Here: <|ref|>no box<|/ref|> and " + find_reply("an apple", (40, 40, 50, 50)))
    assert [(n, text) for n, _style, text in marks(answer_html(first, session))] == [(1, "cat"), (2, "the dog")]
    assert [(n, text) for n, _style, text in marks(answer_html(second, session))] == [(None, "no box"), (3, "an apple")]
    for n, style, _text in marks(answer_html(first, session)):
        color = session.colors.hex(["cat", "the dog"][n - 1])
        assert style["background"] == color + "33" and style["color"] == "inherit"  # a tint, own text colour
        assert style["border-bottom"] == f"3px solid {color}"

    assert session.select_number(3)
    (_plain, (n, style, _text)) = marks(answer_html(second, session))
    color = session.colors.hex("an apple")
    # The selected phrase stands out: a stronger tint and an outline in its box's colour, own text colour.
    assert n == 3 and style["background"] == color + "66" and style["outline"] == f"2px solid {color}"
    assert style["color"] == "inherit" and style["border-bottom"] == f"3px solid {color}"
    assert all(
        s["background"].endswith("33") and "outline" not in s for _n, s, _t in marks(answer_html(first, session))
    )
    assert session.select_number(1)
    assert [("outline" in s) for _n, s, _t in marks(answer_html(first, session))] == [True, False]
    assert [("outline" in s) for _n, s, _t in marks(answer_html(second, session))] == [False, False]


def luminance(hex_color: str) -> float:
    def channel(value: int) -> float:
        c = value / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    digits = hex_color.lstrip("#")
    if len(digits) == 3:
        digits = "".join(d * 2 for d in digits)
    r, g, b = (channel(int(digits[i : i + 2], 16)) for i in (0, 2, 4))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def join(url: str, message: dict, *, max_new_tokens: int) -> Iterator[dict]:
    """Send ``message`` as the page does (a fresh session); the event's queue messages as they come."""
    yield from send_messages(url, uuid.uuid4().hex, message, max_new_tokens=max_new_tokens)


class Browser:
    """What the page holds after each streamed message: the first brings whole values, later ones
    diffs (applied as Gradio's client does). ``shown``: the values after each message; ``diffs``:
    each later message's diffs."""

    def __init__(self) -> None:
        self.values: list | None = None
        self.shown: list[list] = []
        self.diffs: list[list] = []

    def receive(self, message: dict) -> None:
        data = message["output"]["data"]
        if self.values is None:
            self.values = copy.deepcopy(data)
        else:
            self.diffs.append(data)
            self.values = [apply_diff(copy.deepcopy(v), d) for v, d in zip(self.values, data, strict=True)]
        self.shown.append(copy.deepcopy(self.values))


def is_skip(value) -> bool:
    """An update that leaves the component as it is (``gr.skip()``): no value in it."""
    return isinstance(value, dict) and value.get("__type__") == "update" and set(value) <= {"__type__", "props"}


def carries_data(diff: list) -> bool:
    """Whether a diff sends anything but deletions and the skip marker."""
    return any(not (op == "delete" or value == "update" or is_skip(value)) for op, _path, value in diff)


def assistant_text(chat: list[dict]) -> str:
    (text,) = [part["text"] for part in chat[-1]["content"] if part["type"] == "text"]
    assert chat[-1]["role"] == "assistant"
    return text


def box_numbers_in(chat: list[dict]) -> list[int]:
    return sorted({int(n) for n in re.findall(r"vl2-box-(\d+)", assistant_text(chat))})


TOKEN_S = 0.001  # the fake model writes at most 1,000 tokens a second, like a fast GPU


class PacedBackend(ScriptedBackend):
    """The scripted text at a model's pace: each token takes at least TOKEN_S (so the reply lasts
    many of the page's update intervals; nothing in the test waits on this)."""

    def stream(self, conversation, settings, **kwargs) -> ReplyHandle:
        handle = super().stream(conversation, settings, **kwargs)
        never = threading.Event()

        def paced() -> Iterator[str]:
            try:
                for piece in handle:
                    never.wait(TOKEN_S)
                    yield piece
            finally:
                handle.close()

        return ReplyHandle(paced(), handle.cancel_event)


def long_script(words: int = 3000, box_every: int = 100) -> str:
    parts = []
    for i in range(words):
        parts.append(f" w{i}")
        if i % box_every == box_every - 1:
            parts.append(" " + find_reply(f"thing{i // box_every}", (100, 200, 300, 400)))
    return "".join(parts).strip()


def stream_long_reply(tmp_path: Path, script: str) -> tuple[PacedBackend, list[dict], float]:
    """One reply of 2,048 tokens to a message with an image; its messages, and how long it took."""
    backend = PacedBackend(script)
    with running_app(backend, tmp_path) as url:
        url = url.rstrip("/")
        image = upload(url, solid_image(tmp_path / "photo.png", (64, 48)))
        started = time.monotonic()
        messages = list(join(url, {"text": "Describe it.", "files": [image]}, max_new_tokens=2048))
        elapsed = time.monotonic() - started
    return backend, messages, elapsed


def test_a_long_reply_streams_in_few_updates_that_resend_only_what_changed(tmp_path):
    script = long_script()
    backend, messages, elapsed = stream_long_reply(tmp_path, script)
    (record,) = backend.records
    assert record.pieces_total == record.pieces_sent == 2048  # the whole max_new_tokens was generated
    reply = "".join(split_into_pieces(script)[:2048])
    boxes = reply.count("<|/det|>")
    assert boxes == 2048 // 110  # a box every 100 words: 110 pieces with its tags
    generating = [m for m in messages if m["msg"] == "process_generating"]
    final = messages[-1]
    assert final["msg"] == "process_completed" and final["success"]
    assert elapsed >= 2048 * TOKEN_S

    # Coalesced: after the first two (the question at once, then the reply starting), updates are at
    # least BOX_INTERVAL_S apart, and those that bring no box at least STREAM_INTERVAL_S apart.
    assert len(generating) * 10 < 2048
    assert len(generating) <= 3 + elapsed / ui.BOX_INTERVAL_S

    browser = Browser()
    for message in generating:
        browser.receive(message)
    first, *middle, last = browser.shown
    assert first[CANVAS]["image"]["width"] == 64 and first[CANVAS]["boxes"] == []  # the image, at once
    assert assistant_text(first[CHAT]) == "…"
    previous_numbers: list[int] = []
    text_only = with_boxes = 0
    for diff, shown in zip(browser.diffs[:-1], middle, strict=True):
        numbers = box_numbers_in(shown[CHAT])
        changed = numbers != previous_numbers
        previous_numbers = numbers
        for index in (HEADER, LABEL_FILTER, PROMPT, STATE):  # never sent mid-stream
            assert not carries_data(diff[index]), (index, diff[index])
        assert is_skip(shown[HEADER]) and is_skip(shown[LABEL_FILTER]) and is_skip(shown[PROMPT])
        assert diff[RAW] == [] or [op for op, _path, _value in diff[RAW]] == ["append"]  # raw text: only what is new
        if not carries_data(diff[CANVAS]):
            text_only += 1
            if not changed:  # no box came: neither the canvas nor the panel nor the counts is sent again
                for index in (CANVAS, PANEL, COUNTS):
                    assert not carries_data(diff[index]), (index, diff[index])
                    assert is_skip(shown[index]) and len(json.dumps(diff[index])) < 300
        else:  # a box came: the canvas and the panel list every box so far, numbered as in the chat
            with_boxes += 1
            assert [b["n"] for b in shown[CANVAS]["boxes"]] == list(range(1, len(shown[CANVAS]["boxes"]) + 1))
            assert set(numbers) <= {b["n"] for b in shown[CANVAS]["boxes"]}
            listed = [int(n) for n in re.findall(r'data-box-index="(\d+)"', shown[PANEL])]  # rendered just after
            assert listed == list(range(1, len(listed) + 1)) and listed[: len(shown[CANVAS]["boxes"])] == [
                b["n"] for b in shown[CANVAS]["boxes"]
            ]
    assert with_boxes >= 5, "boxes must appear while the reply streams, not only at its end"
    assert text_only >= 5
    assert text_only <= 2 + elapsed / ui.STREAM_INTERVAL_S

    # The last update, and the completed message, carry the whole reply and every box.
    done = final["output"]["data"]
    assert done[RAW] == last[RAW] == reply
    last_word = int(re.findall(r"w(\d+)", reply)[-1])  # 2,048 tokens end at w1867
    words = [int(w) for w in re.findall(r"\bw(\d+)\b", html.unescape(assistant_text(done[CHAT])))]
    assert words == list(range(last_word + 1))
    assert assistant_text(last[CHAT]) == assistant_text(done[CHAT])
    every = list(range(1, boxes + 1))
    assert [b["n"] for b in done[CANVAS]["boxes"]] == [b["n"] for b in last[CANVAS]["boxes"]] == every
    assert box_numbers_in(done[CHAT]) == every


def test_the_reply_is_never_parsed_while_an_update_is_drawn(tmp_path, monkeypatch):
    """The backend is read in a thread of its own (streaming.coalesced), but only text crosses it:
    boxes are parsed in the handler's step, never while that step draws the chat and the canvas —
    else a box parsed in between could be named in the chat but missing from the canvas."""
    script = " ".join(f"w{i} " + find_reply(f"thing{i}", (100, 200, 300, 400)) for i in range(40))
    drawing = threading.Event()
    overlaps: list[str] = []
    parsed = 0
    record_grounding, view_paths = Session.record_grounding, Controller.view_paths

    def recording(self, turn, result, *, final):
        nonlocal parsed
        if drawing.is_set():
            overlaps.append(turn.reply[-40:])
        parsed += 1
        record_grounding(self, turn, result, final=final)

    def rendering(self, session, entries=None):
        drawing.set()
        try:
            return view_paths(self, session, entries)
        finally:
            drawing.clear()

    monkeypatch.setattr(Session, "record_grounding", recording)
    monkeypatch.setattr(Controller, "view_paths", rendering)
    backend = PacedBackend(script)
    with running_app(backend, tmp_path) as url:
        url = url.rstrip("/")
        image = upload(url, solid_image(tmp_path / "photo.png", (64, 48)))
        messages = list(join(url, {"text": "Where are they?", "files": [image]}, max_new_tokens=2048))
    assert messages[-1]["msg"] == "process_completed" and messages[-1]["success"]
    assert parsed > 1 and overlaps == []
    browser = Browser()
    for message in messages:
        if message["msg"] == "process_generating":
            browser.receive(message)
            if not is_skip(browser.values[CANVAS]):
                drawn = {b["n"] for b in browser.values[CANVAS]["boxes"]}
            assert set(box_numbers_in(browser.values[CHAT])) <= drawn


def test_the_reply_says_it_is_waiting_for_the_model_then_answers(tmp_path):
    release, reported = threading.Event(), threading.Event()

    def loader(progress):
        progress("downloading: 1.20/6.74 GB")
        reported.set()
        if not release.wait(timeout=REQUEST_SECONDS):
            raise RuntimeError("the test never released the model")
        return ScriptedBackend("The real reply.", info=BackendInfo("tiny", "bf16", "cpu"))

    backend = BackgroundLoadedBackend(loader, BackendInfo("deepseek-ai/deepseek-vl2-tiny", "loading…", "auto"))
    try:
        assert reported.wait(timeout=30) and not backend.ready
        with running_app(backend, tmp_path) as url:
            browser, waiting = Browser(), []
            for message in join(url.rstrip("/"), {"text": "hello", "files": []}, max_new_tokens=64):
                if message["msg"] != "process_generating":
                    continue
                browser.receive(message)
                if len(browser.shown) == 1:  # at once: the question, and a reply still to come
                    assert [m["role"] for m in browser.values[CHAT]] == ["user", "assistant"]
                    assert assistant_text(browser.values[CHAT]) == "…"
                    continue
                text = html.unescape(assistant_text(browser.values[CHAT]))
                if text.startswith("Waiting for the model ("):
                    assert re.fullmatch(r"Waiting for the model \(downloading: 1\.20/6\.74 GB, \d+ s\)…", text), text
                    assert not carries_data(browser.diffs[-1][CANVAS]) and not carries_data(browser.diffs[-1][PANEL])
                    waiting.append(text)
                    release.set()  # the model is ready now
                else:
                    assert release.is_set(), f"a reply before the model was ready: {text!r}"
            assert waiting, "no update said the reply is waiting for the model"
            assert message["msg"] == "process_completed" and message["success"]
            done = message["output"]["data"]
            assert assistant_text(done[CHAT]) == "The real reply." and done[RAW] == "The real reply."
            assert backend.ready
    finally:
        release.set()
