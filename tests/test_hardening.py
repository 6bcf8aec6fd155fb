"""Bad input, adversarial model output and source hygiene: clear messages, nothing lost.

The corpus is generated here (no binary fixtures) and goes through the same entry point the UI
and the API use (``Controller.accept``).
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from app.backends.base import BackendInfo
from app.backends.scripted import ScriptedBackend
from app.controller import Controller, UserError
from app.limits import Limits
from app.modes import Mode
from app.session import Session
from app.views import answer_html
from model.generation import GenerationSettings
from model.images import ImageError, ingest_image

from .app_support import find_reply, solid_image

ROOT = Path(__file__).resolve().parents[1]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny file whose header claims 30000×30000 pixels (decoding it would need ~2.7 GB)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), color) for color in ("red", "green", "blue")]
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_with_transparency() -> bytes:
    image = Image.new("P", (20, 20), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.info["transparency"] = 0
    return encoded(image, "PNG", transparency=0)


JPEG = encoded(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
BAD_FILES = {
    "truncated.jpg": (JPEG[: len(JPEG) // 3], "damaged"),
    "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20, "damaged"),
    "empty.jpg": (b"", "empty"),
    "notes.jpg": (b"This is plain text renamed to .jpg\n" * 5, "not_an_image"),
    "drawing.svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "unsupported"),
    "paper.pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "unsupported"),
    "bomb.png": (bomb_png(), "too_large"),
    "iphone.heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, "unsupported"),
    # 64 MP in a strip one pixel high: within the pixel limit, but minutes of work; refused from the header.
    "strip.png": (bomb_png(64_000_000, 1), "too_large"),
    "sliver.png": (bomb_png(10, 5000), "bad_shape"),
}
GOOD_FILES = {
    "one_pixel.png": (encoded(Image.new("RGB", (1, 1), "white"), "PNG"), (1, 1), []),
    "needle.png": (encoded(Image.new("RGB", (25, 5000), "white"), "PNG"), (25, 5000), []),
    "cmyk.jpg": (encoded(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"), (30, 20), []),
    "sixteen_bit.png": (encoded(Image.new("I;16", (30, 20), 40000), "PNG"), (30, 20), []),
    "palette_alpha.png": (palette_with_transparency(), (20, 20), []),
    "animated.gif": (animated("GIF"), (40, 30), ["first of its 3 frames"]),
    "animated.webp": (animated("WEBP"), (40, 30), ["first of its 3 frames"]),
}


@pytest.fixture
def app_parts(tmp_path):
    backend = ScriptedBackend(find_reply("thing", (100, 100, 500, 500)))
    controller, session = Controller(backend, image_dir=tmp_path / "images"), Session()
    controller.accept(session, "thing", [solid_image(tmp_path / "first.png", (200, 100))], Mode.FIND)
    list(controller.run_turn(session, session.turns[-1], GenerationSettings()))
    return backend, controller, session


def snapshot(session: Session):
    return (
        list(session.images),
        [(t.user_text, t.reply, list(t.boxes)) for t in session.turns],
        list(session.pending_images),
        session.active_image,
    )


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_are_refused_with_a_category_and_nothing_is_lost(name, tmp_path, app_parts):
    data, category = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as info:
        ingest_image(path, max_pixels=64_000_000)
    assert info.value.category == category
    _backend, controller, session = app_parts
    before = snapshot(session)
    good = solid_image(tmp_path / "good.png", (50, 50))
    with pytest.raises(UserError, match=re.escape(name)):
        controller.accept(session, "and this?", [good, path], Mode.ASK)  # all or nothing
    assert snapshot(session) == before
    # the server still answers a normal request afterwards
    turn, _ = controller.accept(session, "thing", [good], Mode.FIND)
    list(controller.run_turn(session, turn, GenerationSettings()))
    assert turn.boxes and turn.error is None


def test_messages_say_what_to_do(tmp_path):
    def message(name: str) -> str:
        path = tmp_path / name
        path.write_bytes(BAD_FILES[name][0])
        with pytest.raises(ImageError) as info:
            ingest_image(path)
        return str(info.value)

    assert "pillow-heif" in message("iphone.heic")
    assert "PNG" in message("drawing.svg") and "export" in message("paper.pdf")
    assert "900 MP" in message("bomb.png") and "limit" in message("bomb.png")
    assert "empty" in message("empty.jpg")


@pytest.mark.parametrize("name", sorted(GOOD_FILES))
def test_unusual_but_legal_images_are_accepted(name, tmp_path):
    data, size, notes = GOOD_FILES[name]
    path = tmp_path / name
    path.write_bytes(data)
    ingested = ingest_image(path)
    assert ingested.image.mode == "RGB" and ingested.image.size == size
    for expected in notes:
        assert any(expected in note for note in ingested.notes)


def test_transparency_becomes_white_and_sixteen_bit_keeps_its_brightness(tmp_path):
    (tmp_path / "p.png").write_bytes(palette_with_transparency())
    assert ingest_image(tmp_path / "p.png").image.getpixel((0, 0)) == (255, 255, 255)
    (tmp_path / "s.png").write_bytes(GOOD_FILES["sixteen_bit.png"][0])
    assert ingest_image(tmp_path / "s.png").image.getpixel((0, 0))[0] == 40000 // 256


def test_animated_images_are_said_to_use_the_first_frame(tmp_path, app_parts):
    _backend, controller, session = app_parts
    path = tmp_path / "animated.gif"
    path.write_bytes(animated("GIF"))
    _turn, notes = controller.accept(session, "what is it?", [path], Mode.ASK)
    assert any("first of its 3 frames" in note for note in notes)
    assert session.images[session.turns[-1].image_keys[0]].image.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    ("text", "files", "reason"),
    [
        ("", 0, "Type a question"),
        ("x" * 100_000, 0, "characters"),
        ("compare", 20, "20 images"),
    ],
)
def test_bad_messages_are_refused_and_nothing_is_lost(text, files, reason, tmp_path, app_parts):
    _backend, controller, session = app_parts
    before = snapshot(session)
    images = [solid_image(tmp_path / f"{i}.png", (20, 20)) for i in range(files)]
    with pytest.raises(UserError, match=reason):
        controller.accept(session, text, images, Mode.ASK)
    assert snapshot(session) == before


def test_a_conversation_past_the_context_is_trimmed_not_broken(tmp_path, app_parts):
    backend, controller, session = app_parts
    for index in range(12):
        turn, _ = controller.accept(
            session, f"question {index}", [solid_image(tmp_path / f"{index}.png", (30, 30))], Mode.ASK
        )
        updates = list(controller.run_turn(session, turn, GenerationSettings(max_new_tokens=512)))
        assert updates[-1].done and turn.error is None
    assert backend.count_tokens(session.messages()) <= backend.info.context_length - 512


ADVERSARIAL_REPLIES = {
    "unclosed": "<|ref|>cat<|/ref|><|det|>[[1, 2, 3",
    "ten thousand boxes": "<|ref|>dot<|/ref|><|det|>[" + ", ".join("[1, 2, 3, 4]" for _ in range(10_000)) + "]<|/det|>",
    "beyond 999": "<|ref|>big<|/ref|><|det|>[[-50, 20, 5000, 99999]]<|/det|>",
    "markup label": (
        '<|ref|><script>alert(1)</script><img src=x onerror="alert(2)"><|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>'
    ),
}


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL_REPLIES))
def test_adversarial_model_output_is_contained(kind, tmp_path):
    backend = ScriptedBackend(ADVERSARIAL_REPLIES[kind], info=BackendInfo("scripted", "n/a", "cpu", 200_000))
    limits = Limits(max_new_tokens=150_000)  # the scripted backend counts words as tokens
    controller, session = Controller(backend, image_dir=tmp_path, limits=limits), Session()
    turn, _ = controller.accept(session, "x", [solid_image(tmp_path / "a.png", (640, 480))], Mode.FIND)
    list(controller.run_turn(session, turn, GenerationSettings(max_new_tokens=100_000)))
    for box in turn.boxes:
        x1, y1, x2, y2 = box.xyxy
        assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480
        assert all(0 <= v <= 999 for v in box.norm999)
    html = answer_html(turn, session)
    assert "<script" not in html and "<img" not in html
    if kind == "ten thousand boxes":
        assert len(turn.boxes) == 1000 and any("too many" in r.reason for r in turn.rejected)
    if kind == "unclosed":
        assert not turn.boxes and any("unclosed" in r.reason for r in turn.rejected)


def test_no_eval_exec_or_remote_code_in_the_source():
    offenders = []
    for path in [*ROOT.glob("model/**/*.py"), *ROOT.glob("app/**/*.py"), ROOT / "app.py"]:
        source = path.read_text(encoding="utf-8")
        # the builtins (a method such as model.eval() is fine), and literal_eval on model text
        for pattern in (r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"trust_remote_code\s*=\s*True", r"literal_eval"):
            if re.search(pattern, source):
                offenders.append(f"{path.relative_to(ROOT)}: {pattern}")
    assert offenders == []


def test_secure_launch_defaults():
    from app.launch import build_parser

    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.share is False
