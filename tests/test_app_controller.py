"""App behaviour without a browser: ingest, modes, streaming boxes, Stop, notices, trimming."""

from __future__ import annotations

import pickle
import threading

import pytest

from app.backends.base import BackendError, BackendInfo
from app.backends.scripted import ScriptedBackend
from app.controller import TILING_OFF_NOTICE, Controller, UserError
from app.modes import Mode, build_prompt
from app.session import Session
from model.generation import GenerationSettings

from .app_support import find_reply, solid_image

SETTINGS = GenerationSettings(max_new_tokens=256)


def make(tmp_path, script="Hello.", **kwargs):
    backend = ScriptedBackend(script, **kwargs)
    return backend, Controller(backend, image_dir=tmp_path / "images"), Session()


@pytest.mark.parametrize(
    ("mode", "text", "prompt"),
    [
        (Mode.ASK, "What is this?", "What is this?"),
        (Mode.FIND, "the red car", "<|ref|>the red car<|/ref|>."),
        (Mode.FIND, "find all apples", "<|ref|>apples<|/ref|>."),
        (Mode.GROUNDED, "Describe the scene.", "<|grounding|>Describe the scene."),
        (Mode.FIND, "<|ref|>typed<|/ref|>", "<|ref|>typed<|/ref|>"),
        (Mode.ASK, "<|grounding|>raw tokens work", "<|grounding|>raw tokens work"),
    ],
)
def test_modes_build_the_official_prompts(mode, text, prompt):
    assert build_prompt(mode, text) == prompt


def run(controller, session, text, mode=Mode.FIND, settings=SETTINGS):
    turn = controller.begin(session, text, mode)
    return turn, list(controller.run_turn(session, turn, settings))


@pytest.mark.parametrize(
    ("stored", "orientation", "seen"),
    [((640, 480), None, (640, 480)), ((300, 500), None, (300, 500)), ((300, 200), 6, (200, 300))],
)
def test_boxes_are_in_pixels_of_the_image_as_seen(tmp_path, stored, orientation, seen):
    backend, controller, session = make(tmp_path, find_reply("cat", (100, 200, 300, 400)))
    path = solid_image(tmp_path / "photo.jpg", stored, exif_orientation=orientation)
    assert controller.ingest(session, [path]).problems == []
    turn, _updates = run(controller, session, "cat")
    width, height = seen
    assert session.images["img1"].size == seen  # EXIF applied once, at ingest
    (box,) = turn.boxes
    assert box.norm999 == (100, 200, 300, 400)
    expected = (100 / 999 * width, 200 / 999 * height, 300 / 999 * width, 400 / 999 * height)
    assert box.xyxy == pytest.approx(expected, abs=0.01)
    assert turn.target_image == "img1"
    # the model saw the canonical image, and the Find prompt
    (message,) = backend.conversations[-1]
    assert message.text == "<|ref|>cat<|/ref|>." and message.images[0].size == seen


def test_boxes_appear_while_the_answer_streams(tmp_path):
    script = find_reply("a", (0, 0, 10, 10)) + " and then " + find_reply("b", (20, 20, 30, 30))
    gate = threading.Semaphore(0)
    _backend, controller, session = make(tmp_path, script, gate=gate)
    controller.ingest(session, [solid_image(tmp_path / "x.png", (100, 100))])
    turn = controller.begin(session, "<|grounding|>go", Mode.ASK)
    updates = controller.run_turn(session, turn, SETTINGS)
    next(updates)  # the turn started
    counts = []
    for _ in range(len(script)):
        gate.release()
        try:
            update = next(updates)
        except StopIteration:
            break
        counts.append((len(update.turn.boxes), update.done))
        if update.done:
            break
    box_counts = [c for c, _ in counts]
    assert box_counts == sorted(box_counts)  # monotone
    assert 1 in box_counts, "the first box must show before the second is written"
    assert box_counts[-1] == 2 and counts[-1][1] is True


def test_stop_ends_the_backend_generation(tmp_path):
    gate = threading.Semaphore(0)
    script = " ".join(f"word{i}" for i in range(200))
    backend, controller, session = make(tmp_path, script, gate=gate)
    turn = controller.begin(session, "talk", Mode.ASK)
    updates = controller.run_turn(session, turn, SETTINGS)
    next(updates)
    for _ in range(3):
        gate.release()
        next(updates)
    controller.stop(session)
    gate.release()  # the generator's next step sees the cancel
    rest = list(updates)
    record = backend.records[-1]
    assert record.finished.is_set()
    assert record.cancelled_at is not None and record.cancelled_at <= 4
    assert record.pieces_sent < record.pieces_total
    assert rest[-1].done and turn.stopped
    assert turn.reply.startswith("word0 word1 word2")


def test_three_images_turn_tiling_off_with_a_notice(tmp_path):
    _backend, controller, session = make(tmp_path, "ok")
    controller.ingest(session, [solid_image(tmp_path / f"{i}.png", (64, 64)) for i in range(3)])
    _turn, updates = run(controller, session, "compare", Mode.ASK)
    assert TILING_OFF_NOTICE in updates[0].notices
    session.keep_only("img2")
    assert list(session.images) == ["img2"] and session.pending_images == ["img2"] and not session.turns


def test_history_is_trimmed_to_the_context_with_a_notice(tmp_path):
    info = BackendInfo("scripted", "n/a", "cpu", context_length=600)
    backend, controller, session = make(tmp_path, "fine", info=info, tokens_per_image=100)
    settings = GenerationSettings(max_new_tokens=256)
    notices = []
    for index in range(8):
        controller.ingest(session, [solid_image(tmp_path / f"{index}.png", (32, 32))])
        _turn, updates = run(controller, session, f"question {index}", Mode.ASK, settings)
        notices += [n for u in updates for n in u.notices]
    assert any("oldest turn was dropped" in n for n in notices)
    assert backend.count_tokens(session.messages()) <= 600 - 256
    assert session.turns[-1].user_text == "question 7"


def test_bad_input_is_refused_and_nothing_is_lost(tmp_path):
    _backend, controller, session = make(tmp_path, find_reply("x", (1, 2, 3, 4)))
    controller.ingest(session, [solid_image(tmp_path / "a.png", (50, 50))])
    run(controller, session, "x")
    before = (list(session.images), len(session.turns), list(session.turns[0].boxes))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a jpeg")
    problems = controller.ingest(session, [broken]).problems
    assert len(problems) == 1 and "broken.jpg" in problems[0]
    with pytest.raises(UserError, match="Type a question"):
        controller.begin(session, "   ", Mode.ASK)
    assert (list(session.images), len(session.turns), list(session.turns[0].boxes)) == before


def test_find_without_an_image_is_explained(tmp_path):
    _backend, controller, session = make(tmp_path)
    with pytest.raises(UserError, match="upload one"):
        controller.begin(session, "the cat", Mode.FIND)


def test_backend_errors_become_a_message_and_the_next_request_works(tmp_path):
    failing = ScriptedBackend("one two three", fail_after=1, failure=BackendError("out of memory (simulated)"))
    controller, session = Controller(failing, image_dir=tmp_path), Session()
    turn, updates = run(controller, session, "hi", Mode.ASK)
    assert turn.error == "out of memory (simulated)" and updates[-1].done
    failing.fail_after = None
    turn2, _ = run(controller, session, "again", Mode.ASK)
    assert turn2.error is None and turn2.reply == "one two three"


def test_malformed_spans_are_reported_not_drawn(tmp_path):
    script = find_reply("ok", (1, 2, 3, 4)) + "<|ref|>bad<|/ref|><|det|>[[1, 2, 3]]<|/det|>"
    _backend, controller, session = make(tmp_path, script)
    controller.ingest(session, [solid_image(tmp_path / "a.png", (50, 50))])
    turn, _ = run(controller, session, "x")
    assert [b.label for b in turn.boxes] == ["ok"]
    assert len(turn.rejected) == 1 and "3 numbers" in turn.rejected[0].reason


def test_retry_and_undo(tmp_path):
    backend, controller, session = make(tmp_path, "answer")
    run(controller, session, "first", Mode.ASK)
    turn = controller.retry_turn(session)
    assert turn.user_text == "first" and len(session.turns) == 1
    list(controller.run_turn(session, turn, SETTINGS))
    assert len(backend.conversations) == 2
    undone = session.undo()
    assert undone.user_text == "first" and session.turns == []


def test_a_session_says_while_a_reply_is_being_written(tmp_path):
    """The page refuses Undo and "keep only" while this is set (they would take the turn away)."""
    _backend, controller, session = make(tmp_path, "one two three four")
    turn, _ = controller.accept(session, "hello", [], Mode.ASK)
    stream = controller.run_turn(session, turn, GenerationSettings())
    next(stream)
    assert session.replying
    list(stream)
    assert not session.replying
    turn, _ = controller.accept(session, "again", [], Mode.ASK)
    stream = controller.run_turn(session, turn, GenerationSettings())
    next(stream)
    stream.close()  # the browser went away mid-reply
    assert not session.replying
    assert not pickle.loads(pickle.dumps(session)).replying
