"""Undo takes back box renames and deletes as well as turns, newest action first."""

from __future__ import annotations

import pickle

from PIL import Image

from app.modes import Mode
from app.session import BoxEdit, Session, Turn
from model.grounding import parse_grounding

from .app_support import BACKGROUND, find_reply


def with_image(session: Session | None = None) -> Session:
    session = session or Session()
    session.add_image(Image.new("RGB", (640, 480), BACKGROUND), f"photo{session.images_added + 1}.png")
    return session


def ask(session: Session, reply: str, text: str = "find") -> Turn:
    turn = session.start_turn(text, f"<|ref|>{text}<|/ref|>.", Mode.FIND)
    session.update_reply(turn, reply, final=True)
    return turn


def labels(turn: Turn) -> list[str | None]:
    return [box.label for box in turn.boxes]


def test_undo_of_a_rename_brings_back_the_label_and_its_colour():
    session = with_image()
    turn = ask(session, find_reply("cat", (10, 10, 500, 500)) + find_reply("dog", (600, 600, 900, 900)))
    original = turn.boxes[0]
    cat_colour = session.colors.color("cat")
    assert session.select_number(1)
    renamed = session.rename_selected("bird")
    assert renamed is not None and labels(turn) == ["bird", "dog"]
    assert session.colors.color("bird") != cat_colour

    session.selected = None
    undone = session.undo()
    assert isinstance(undone, BoxEdit) and undone.kind == "rename" and undone.box == original
    assert turn.boxes[0] == original and labels(turn) == ["cat", "dog"]
    assert session.colors.color(turn.boxes[0].label) == cat_colour
    assert session.selected == (0, 0) and session.selected_box() == original
    assert session.edits == []
    assert session.undo() is turn and session.turns == []  # then the turn itself
    assert session.undo() is None


def test_renaming_to_the_same_label_is_not_an_edit():
    session = with_image()
    turn = ask(session, find_reply("cat", (10, 10, 500, 500)))
    session.select_number(1)
    assert session.rename_selected("  cat ") == turn.boxes[0]
    assert session.edits == []
    assert session.undo() is turn


def test_undo_of_a_delete_puts_the_box_back_at_its_index_and_number():
    session = with_image()
    reply = "<|ref|>apple<|/ref|><|det|>[[1, 1, 90, 90], [100, 100, 200, 200], [300, 300, 400, 400]]<|/det|>"
    turn = ask(session, reply)
    before = session.numbered_boxes()
    assert session.select_number(2)
    middle = session.selected_box()
    assert session.delete_selected() == middle
    assert [box.norm999 for _n, _t, _b, box in session.numbered_boxes()] == [(1, 1, 90, 90), (300, 300, 400, 400)]

    undone = session.undo()
    assert isinstance(undone, BoxEdit) and undone.kind == "delete" and undone.box == middle
    assert session.numbered_boxes() == before
    assert turn.boxes[1] == middle and session.selected == (0, 1)
    assert session.select_number(2) and session.selected_box() == middle


def test_interleaved_edits_and_turns_are_undone_newest_first():
    session = with_image()
    turn1 = ask(session, find_reply("cat", (10, 10, 500, 500)), "cat")
    session.select_number(1)
    session.rename_selected("kitten")
    with_image(session)
    turn2 = ask(session, find_reply("dog", (20, 20, 300, 300)), "dog")
    session.select_number(2)
    session.delete_selected()
    assert labels(turn1) == ["kitten"] and turn2.boxes == []

    first = session.undo()
    assert isinstance(first, BoxEdit) and first.kind == "delete" and labels(turn2) == ["dog"]
    assert session.selected == (1, 0)
    assert session.undo() is turn2
    assert session.turns == [turn1] and session.pending_images == ["img2"]  # its image can be sent again
    third = session.undo()
    assert isinstance(third, BoxEdit) and third.kind == "rename" and labels(turn1) == ["cat"]
    assert session.undo() is turn1
    assert session.undo() is None and session.turns == [] and session.edits == []


def test_a_click_turn_after_an_edit_is_undone_before_it():
    session = with_image()
    turn = ask(session, find_reply("cat", (10, 10, 500, 500)))
    session.select_number(1)
    session.rename_selected("kitten")
    (clicked,) = parse_grounding(find_reply("mug", (600, 600, 700, 700)), 640, 480).boxes
    click = session.add_click_turn("img1", (420.0, 310.0), "mug", clicked, raw="mug")
    assert session.undo() is click
    assert labels(turn) == ["kitten"]
    assert isinstance(session.undo(), BoxEdit) and labels(turn) == ["cat"]


def test_undo_turn_drops_the_edits_of_the_popped_turn_only():
    session = with_image()
    turn1 = ask(session, find_reply("cat", (10, 10, 500, 500)), "cat")
    turn2 = ask(session, find_reply("dog", (20, 20, 300, 300)), "dog")
    session.select_number(2)
    session.rename_selected("puppy")
    session.select_number(1)
    session.rename_selected("kitten")  # an older turn's box, edited after turn 2

    assert session.undo_turn() is turn2  # what Retry does, whatever edits came after the turn
    assert [(e.turn, e.label) for e in session.edits] == [(turn1, "kitten")]
    again = ask(session, find_reply("dog", (20, 20, 300, 300)), "dog")  # Retry asks the turn again

    assert session.undo() is again  # the new turn is newer than the surviving edit
    undone = session.undo()
    assert isinstance(undone, BoxEdit) and undone.turn is turn1 and labels(turn1) == ["cat"]
    assert session.undo() is turn1 and session.undo() is None


def test_edits_survive_pickling_and_still_point_at_their_turns():
    session = with_image()
    ask(session, find_reply("cat", (10, 10, 500, 500)) + find_reply("dog", (600, 600, 900, 900)))
    session.select_number(1)
    session.rename_selected("kitten")
    session.select_number(2)
    session.delete_selected()

    copy = pickle.loads(pickle.dumps(session))
    assert [e.kind for e in copy.edits] == ["rename", "delete"]
    assert all(e.turn is copy.turns[0] and e.after is copy.turns[0] for e in copy.edits)
    assert isinstance(copy.undo(), BoxEdit) and labels(copy.turns[0]) == ["kitten", "dog"]
    assert isinstance(copy.undo(), BoxEdit) and labels(copy.turns[0]) == ["cat", "dog"]
    assert labels(session.turns[0]) == ["kitten"]  # the original is untouched


def test_dropping_the_oldest_turn_does_not_replay_its_edits_onto_another_box():
    session = with_image()
    turn1 = ask(session, find_reply("cat", (10, 10, 500, 500)), "cat")
    turn2 = ask(session, find_reply("dog", (20, 20, 300, 300)), "dog")
    dog = turn2.boxes[0]
    session.select_number(2)
    session.rename_selected("puppy")
    session.select_number(1)
    session.rename_selected("kitten")  # the newest edit, of the turn about to be dropped

    assert session.drop_oldest_turn() is turn1
    assert session.turns == [turn2]  # turn 2's box is now (0, 0), where turn 1's was
    undone = session.undo()
    assert isinstance(undone, BoxEdit) and undone.turn is turn2
    assert turn2.boxes == [dog] and session.selected == (0, 0)
    assert session.undo() is turn2 and session.undo() is None


def test_a_box_that_came_back_by_a_new_parse_is_not_put_back_twice():
    session = with_image()
    turn = ask(session, find_reply("cat", (10, 10, 500, 500)))
    session.select_number(1)
    session.delete_selected()  # while the reply is still being parsed, say
    session.update_reply(turn, turn.reply, final=True)  # the parse brings the box back
    assert labels(turn) == ["cat"]
    assert session.undo() is turn  # the stale delete is skipped, not replayed as a duplicate
    assert session.edits == []


def test_keep_only_forgets_the_edits():
    session = with_image()
    ask(session, find_reply("cat", (10, 10, 500, 500)))
    session.select_number(1)
    session.rename_selected("kitten")
    session.keep_only("img1")
    assert session.edits == [] and session.undo() is None
