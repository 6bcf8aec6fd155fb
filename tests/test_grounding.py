"""Grounding answers to boxes: well-formed answers, every malformed kind, streaming, size limits."""

from __future__ import annotations

import json
import random

import pytest

from model.grounding import (
    DEFAULT_MAX_BOXES,
    Box,
    GroundingResult,
    Rejected,
    StreamingGroundingParser,
    parse_grounding,
    strip_grounding_tags,
)

EOS = "<｜end▁of▁sentence｜>"
GROUNDED = (
    "<|grounding|>The <|ref|>dog<|/ref|><|det|>[[1,2,3,4]]<|/det|> chases a "
    "<|ref|>ball<|/ref|><|det|>[[5,6,7,8], [10, 20, 30, 40]]<|/det|> across the "
    "<|ref|>lawn<|/ref|><|det|>[[0, 500, 999, 999]]<|/det|>." + EOS
)


def reasons(result: GroundingResult) -> list[str]:
    return [r.reason for r in result.rejected]


# --- well-formed answers -------------------------------------------------------------------------


def test_single_box():
    text = "<|ref|>the cat<|/ref|><|det|>[[12, 40, 500, 980]]<|/det|>"
    result = parse_grounding(text, 999, 999)
    assert result.rejected == []
    assert result.boxes == [Box("the cat", (12, 40, 500, 980), (12.0, 40.0, 500.0, 980.0), 0, (0, 22))]


def test_two_boxes_on_640_by_480():
    text = "<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 999], [100, 200, 300, 400]]<|/det|>"
    result = parse_grounding(text, 640, 480)
    assert result.rejected == []
    assert [b.label for b in result.boxes] == ["cat", "cat"]
    assert result.boxes[0].xyxy == (0.0, 0.0, 640.0, 480.0)
    assert result.boxes[1].xyxy == pytest.approx((64.06, 96.10, 192.19, 192.19), abs=1e-9)
    assert result.boxes[1].norm999 == (100, 200, 300, 400)


def test_many_boxes_of_one_ref_share_label_group_and_span():
    text = "<|ref|>people<|/ref|><|det|>[[1,1,2,2],[3,3,4,4],[5,5,6,6]]<|/det|>"
    boxes = parse_grounding(text, 100, 100).boxes
    assert [b.norm999 for b in boxes] == [(1, 1, 2, 2), (3, 3, 4, 4), (5, 5, 6, 6)]
    assert {b.label for b in boxes} == {"people"}
    assert {b.ref_index for b in boxes} == {0}
    assert {b.span for b in boxes} == {(0, len("<|ref|>people<|/ref|>"))}


def test_several_refs_get_their_own_labels_and_indices():
    text = "<|ref|>a<|/ref|><|det|>[[1,2,3,4]]<|/det|><|ref|>b<|/ref|><|det|>[[5,6,7,8],[9,9,9,9]]<|/det|>"
    boxes = parse_grounding(text, 999, 999).boxes
    assert [(b.label, b.ref_index) for b in boxes] == [("a", 0), ("b", 1), ("b", 1)]
    assert text[slice(*boxes[1].span)] == "<|ref|>b<|/ref|>"


def test_grounded_conversation_boxes_and_prose():
    result = parse_grounding(GROUNDED, 999, 999)
    assert result.rejected == []
    assert [(b.label, b.ref_index, b.norm999) for b in result.boxes] == [
        ("dog", 0, (1, 2, 3, 4)),
        ("ball", 1, (5, 6, 7, 8)),
        ("ball", 1, (10, 20, 30, 40)),
        ("lawn", 2, (0, 500, 999, 999)),
    ]
    for box in result.boxes:
        assert GROUNDED[slice(*box.span)] == f"<|ref|>{box.label}<|/ref|>"
    assert strip_grounding_tags(GROUNDED) == "The dog chases a ball across the lawn."


def test_det_without_ref_has_no_label():
    text = "Here: <|det|>[[1, 2, 3, 4]]<|/det|>"
    (box,) = parse_grounding(text, 999, 999).boxes
    assert box.label is None
    assert box.ref_index == 0
    assert text[slice(*box.span)] == "<|det|>[[1, 2, 3, 4]]<|/det|>"


def test_flat_list_is_one_box():
    result = parse_grounding("<|ref|>sun<|/ref|><|det|>[10, 20, 30, 40]<|/det|>", 999, 999)
    assert result.rejected == []
    assert [(b.label, b.norm999) for b in result.boxes] == [("sun", (10, 20, 30, 40))]


def test_end_of_sentence_after_det():
    result = parse_grounding("<|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/det|>" + EOS, 999, 999)
    assert result.rejected == []
    assert len(result.boxes) == 1


def test_whitespace_and_newlines_inside_lists():
    text = "<|ref|>\n  cat \n<|/ref|><|det|>\n[\n  [ 1 ,\t2,3 ,\n 4 ] ,\n  [5,6,7,8]\n]\n<|/det|>"
    result = parse_grounding(text, 999, 999)
    assert result.rejected == []
    assert [(b.label, b.norm999) for b in result.boxes] == [("cat", (1, 2, 3, 4)), ("cat", (5, 6, 7, 8))]


# --- malformed boxes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("[1, 2, 3]", "box has 3 numbers, expected 4"),
        ("[1, 2, 3, 4, 5]", "box has 5 numbers, expected 4"),
        ("[[1, 2, 3, 4]]", "nested list"),
        ("[1.5, 2, 3, 4]", "non-integer value '1.5'"),
        ("[left, top, 3, 4]", "non-numeric value 'left'"),
        ("[123456, 2, 3, 4]", "runaway number with 6 digits"),
        ("[]", "empty list"),
        ("[1, , 3, 4]", "empty value"),
        ("[1 2 3 4]", "non-numeric value '1 2 3 4'"),
    ],
)
def test_bad_box_is_rejected_and_good_boxes_kept(bad, reason):
    text = f"<|ref|>cat<|/ref|><|det|>[[10, 20, 30, 40], {bad}, [50, 60, 70, 80]]<|/det|>"
    result = parse_grounding(text, 999, 999)
    assert [b.norm999 for b in result.boxes] == [(10, 20, 30, 40), (50, 60, 70, 80)]
    assert [b.label for b in result.boxes] == ["cat", "cat"]
    (rejected,) = result.rejected
    assert reason in rejected.reason
    assert rejected.text == bad
    assert text[slice(*rejected.span)] == bad


def test_four_digits_are_fine_five_are_runaway():
    result = parse_grounding("<|det|>[[0999, 1, 2, 3], [-0001, 1, 2, 3], [-12345, 1, 2, 3]]<|/det|>", 999, 999)
    assert [b.norm999 for b in result.boxes] == [(2, 1, 999, 3), (0, 1, 2, 3)]
    assert reasons(result) == ["runaway number with 5 digits (at most 4)"]


def test_stray_text_between_boxes_and_stray_bracket():
    text = "<|det|>[[1,2,3,4], oops, [5,6,7,8]]]<|/det|>"
    result = parse_grounding(text, 999, 999)
    assert len(result.boxes) == 2
    assert [(r.text, r.reason) for r in result.rejected] == [
        ("oops", "unexpected text between boxes"),
        ("]", "unexpected ']'"),
    ]


def test_det_with_no_list_at_all():
    result = parse_grounding("<|det|> 1, 2, 3, 4 <|/det|>", 999, 999)
    assert result.boxes == []
    assert [(r.text, r.reason) for r in result.rejected] == [("1, 2, 3, 4", "no [x1, y1, x2, y2] list in <|det|>")]


@pytest.mark.parametrize(
    ("body", "kept", "reason"),
    [
        ("[[1,2,3,4],[5,6,7", 1, "box missing ']'"),
        ("[[1,2,3,4],[5,6,7,8]", 2, "box list missing ']'"),
        ("[1,2,3,4", 0, "box missing ']'"),
    ],
)
def test_missing_closing_bracket(body, kept, reason):
    result = parse_grounding(f"<|det|>{body}<|/det|>", 999, 999)
    assert len(result.boxes) == kept
    assert reasons(result) == [reason]


def test_empty_det():
    result = parse_grounding("<|ref|>cat<|/ref|><|det|>  <|/det|>", 999, 999)
    assert result.boxes == []
    assert [(r.text, r.reason) for r in result.rejected] == [("<|det|>  <|/det|>", "empty <|det|>")]


def test_cli_example_with_one_short_box():
    text = (
        "<|ref|>cat<|/ref|><|det|>[[0, 0, 999, 999], [100, 200, 300, 400]]<|/det|>"
        "<|ref|>x<|/ref|><|det|>[[1,2,3]]<|/det|>"
    )
    result = parse_grounding(text, 640, 480)
    assert [b.label for b in result.boxes] == ["cat", "cat"]
    assert [(r.text, r.reason) for r in result.rejected] == [("[1,2,3]", "box has 3 numbers, expected 4")]


# --- broken tags and the pairing rule ------------------------------------------------------------


def test_unclosed_ref_pending_until_final():
    text = "<|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/det|> and <|ref|>the d"
    assert parse_grounding(text, 999, 999, final=False).rejected == []
    result = parse_grounding(text, 999, 999)
    assert len(result.boxes) == 1
    assert [(r.text, r.reason, r.span) for r in result.rejected] == [
        ("<|ref|>the d", "unclosed <|ref|>", (len(text) - 12, len(text)))
    ]


def test_unclosed_det_pending_until_final_and_gives_no_boxes():
    text = "<|ref|>cat<|/ref|><|det|>[[1,2,3,4], [5,6,7,8]"
    pending = parse_grounding(text, 999, 999, final=False)
    assert pending.boxes == [] and pending.rejected == []
    result = parse_grounding(text, 999, 999)
    assert result.boxes == []
    assert reasons(result) == ["unclosed <|det|>"]
    assert result.rejected[0].text == "<|det|>[[1,2,3,4], [5,6,7,8]"


def test_ref_without_det_reported_only_when_final():
    text = "Look at <|ref|>the moon<|/ref|>."
    assert parse_grounding(text, 999, 999, final=False).rejected == []
    result = parse_grounding(text, 999, 999)
    assert [(r.text, r.reason) for r in result.rejected] == [("<|ref|>the moon<|/ref|>", "ref without boxes")]


def test_det_close_without_open():
    result = parse_grounding("[[1,2,3,4]]<|/det|> after", 999, 999)
    assert result.boxes == []
    assert [(r.text, r.reason, r.span) for r in result.rejected] == [("<|/det|>", "<|/det|> without <|det|>", (11, 19))]


def test_ref_close_without_open():
    result = parse_grounding("cat<|/ref|><|det|>[[1,2,3,4]]<|/det|>", 999, 999)
    assert [b.label for b in result.boxes] == [None]
    assert reasons(result) == ["<|/ref|> without <|ref|>"]


def test_new_ref_gives_up_on_a_waiting_one():
    text = "The <|ref|>dog<|/ref|> and the <|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    result = parse_grounding(text, 999, 999, final=False)
    assert [(b.label, b.ref_index) for b in result.boxes] == [("cat", 1)]
    assert [(r.text, r.reason) for r in result.rejected] == [("<|ref|>dog<|/ref|>", "ref without boxes")]


def test_prose_between_ref_and_det_still_pairs():
    text = "The <|ref|>dog<|/ref|> sits at <|det|>[[1,2,3,4]]<|/det|>"
    assert [b.label for b in parse_grounding(text, 999, 999).boxes] == ["dog"]


def test_a_ref_labels_only_one_det():
    text = (
        "<|ref|>dog<|/ref|><|det|>[[1,2,3,4]]<|/det|><|det|>[[5,6,7,8]]<|/det|>"
        "<|ref|>cat<|/ref|><|det|>[1,1,2,2]<|/det|>"
    )
    boxes = parse_grounding(text, 999, 999).boxes
    assert [(b.label, b.ref_index) for b in boxes] == [("dog", 0), (None, 1), ("cat", 2)]


def test_tag_inside_open_det_ends_it():
    text = "<|ref|>a<|/ref|><|det|>[[1,2,3,4]<|ref|>b<|/ref|><|det|>[[5,6,7,8]]<|/det|>"
    result = parse_grounding(text, 999, 999)
    assert [(b.label, b.ref_index) for b in result.boxes] == [("b", 1)]
    assert [(r.text, r.reason) for r in result.rejected] == [("<|det|>[[1,2,3,4]", "unclosed <|det|>")]


def test_end_of_sentence_inside_ref_ends_it():
    result = parse_grounding("<|ref|>cat" + EOS, 999, 999, final=False)
    assert reasons(result) == ["unclosed <|ref|>"]


# --- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ("[1200, 10, 5000, 20]", (999, 10, 999, 20)),
        ("[-5, -10, 100, 200]", (0, 0, 100, 200)),
        ("[-9999, 9999, 0, 0]", (0, 0, 0, 999)),
    ],
)
def test_out_of_range_values_are_clamped(values, expected):
    result = parse_grounding(f"<|det|>[{values}]<|/det|>", 999, 999)
    assert result.rejected == []
    assert [b.norm999 for b in result.boxes] == [expected]


def test_swapped_corners_are_ordered():
    (box,) = parse_grounding("<|det|>[[500, 600, 100, 200]]<|/det|>", 999, 999).boxes
    assert box.norm999 == (100, 200, 500, 600)
    assert box.xyxy == (100.0, 200.0, 500.0, 600.0)


@pytest.mark.parametrize(
    ("width", "height", "values", "xyxy"),
    [
        (1, 5000, (0, 1, 999, 998), (0.0, 5.01, 1.0, 4994.99)),
        (1, 1, (333, 500, 999, 999), (0.33, 0.5, 1.0, 1.0)),
        (7, 3, (1, 1, 998, 998), (0.01, 0.0, 6.99, 3.0)),
        (4000, 3000, (1, 2, 3, 4), (4.0, 6.01, 12.01, 12.01)),
    ],
)
def test_pixel_rounding_and_bounds(width, height, values, xyxy):
    (box,) = parse_grounding(f"<|det|>[{list(values)}]<|/det|>", width, height).boxes
    assert box.xyxy == xyxy
    assert 0 <= box.xyxy[0] <= box.xyxy[2] <= width
    assert 0 <= box.xyxy[1] <= box.xyxy[3] <= height


# --- labels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["红色的汽车", "القطة السوداء", "🐱 cat 🐈", "Ünïcödé café"])
def test_non_ascii_labels_are_kept_verbatim(label):
    (box,) = parse_grounding(f"<|ref|>  {label}\n<|/ref|><|det|>[[1,2,3,4]]<|/det|>", 999, 999).boxes
    assert box.label == label


def test_markup_in_label_is_plain_text():
    label = '<script>alert("x")</script> & <b>bold</b>'
    text = f"<|ref|>{label}<|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    result = parse_grounding(text, 999, 999)
    assert [b.label for b in result.boxes] == [label]
    assert strip_grounding_tags(text) == label


# --- prose ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "prose"),
    [
        ("<|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/det|>" + EOS, "cat"),
        ("A <|det|>[[1,2,3,4]]<|/det|>b", "A b"),
        ("The <|ref|>dog<|/ref|><|det|>[[1,2,", "The dog"),
        ("x<|det|>[[1,2<|ref|>y<|/ref|> z", "xy z"),
        ("no tags at all", "no tags at all"),
        ("stray<|/det|> close", "stray close"),
    ],
)
def test_strip_grounding_tags(text, prose):
    assert strip_grounding_tags(text) == prose


# --- streaming -----------------------------------------------------------------------------------


def test_every_prefix_of_a_grounded_answer():
    full = parse_grounding(GROUNDED, 640, 480)
    parser = StreamingGroundingParser(640, 480)
    seen: list[Box] = []
    counts = []
    for end in range(1, len(GROUNDED) + 1):
        seen += parser.feed(GROUNDED[end - 1])
        prefix = parse_grounding(GROUNDED[:end], 640, 480, final=False)
        assert seen == prefix.boxes == full.boxes[: len(prefix.boxes)]
        assert parser.result == prefix
        counts.append(len(prefix.boxes))
    assert counts == sorted(counts)
    assert seen == full.boxes
    assert parser.finish() == full
    assert parser.text == GROUNDED


def test_box_appears_exactly_when_its_det_closes():
    parser = StreamingGroundingParser(999, 999)
    assert parser.feed("<|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/de") == []
    assert parser.feed("t") == []
    (box,) = parser.feed("|>")
    assert box.label == "cat"
    assert parser.feed(" more prose") == []
    assert parser.result.boxes == [box]


@pytest.mark.parametrize("seed", range(8))
def test_random_chopping_matches_full_parse(seed):
    rng = random.Random(seed)
    parts = []
    for index in range(40):
        boxes = ", ".join(
            f"[{rng.randint(-50, 1100)}, {rng.randint(0, 999)}, {rng.randint(0, 999)}, {rng.randint(0, 99999)}]"
            for _ in range(rng.randint(1, 4))
        )
        shape = rng.choice(["ref", "ref", "bare", "lonely", "broken"])
        if shape == "ref":
            parts.append(f"prose {index} <|ref|>obj {index} 物体<|/ref|><|det|>[{boxes}]<|/det|>")
        elif shape == "bare":
            parts.append(f"<|det|>[{boxes}]<|/det|>")
        elif shape == "lonely":
            parts.append(f"<|ref|>only words {index}<|/ref|> then ")
        else:
            parts.append(rng.choice(["<|/det|>", "<|det|>[[1,2,3]", "<|ref|>half", "[[9,9,9,9]]"]))
    text = "<|grounding|>" + "".join(parts) + EOS + "<|det|>[[1,2"
    full = parse_grounding(text, 1280, 720)
    parser = StreamingGroundingParser(1280, 720)
    streamed: list[Box] = []
    position = 0
    while position < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13, 40])
        streamed += parser.feed(text[position : position + size])
        position += size
    assert streamed == full.boxes
    assert len(full.boxes) > 0
    assert parser.finish() == full
    assert parser.result == parse_grounding(text, 1280, 720, final=False)


def test_streaming_ignores_empty_deltas_and_rejects_non_text():
    parser = StreamingGroundingParser(10, 10)
    assert parser.feed("") == []
    assert parser.text == ""
    with pytest.raises(TypeError):
        parser.feed(b"<|det|>")  # type: ignore[arg-type]
    assert parser.finish() == GroundingResult([], [])


# --- limits --------------------------------------------------------------------------------------


def test_ten_thousand_boxes_are_capped():
    boxes = ", ".join(f"[{i % 999}, {i % 500}, 999, 999]" for i in range(10_000))
    text = f"<|ref|>dot<|/ref|><|det|>[{boxes}]<|/det|>"
    result = parse_grounding(text, 640, 480)
    assert len(result.boxes) == DEFAULT_MAX_BOXES
    assert result.boxes[-1].norm999 == ((DEFAULT_MAX_BOXES - 1) % 999, (DEFAULT_MAX_BOXES - 1) % 500, 999, 999)
    (rejected,) = result.rejected
    assert rejected.reason == f"too many boxes: kept {DEFAULT_MAX_BOXES}, dropped {10_000 - DEFAULT_MAX_BOXES}"
    assert rejected.span[1] == len(text) - len("]<|/det|>")


def test_max_boxes_applies_across_dets():
    text = "".join(f"<|ref|>o{i}<|/ref|><|det|>[[1,2,3,4],[5,6,7,8]]<|/det|>" for i in range(3))
    result = parse_grounding(text, 999, 999, max_boxes=3)
    assert [b.label for b in result.boxes] == ["o0", "o0", "o1"]
    assert reasons(result) == ["too many boxes: kept 3, dropped 3"]


@pytest.mark.parametrize(
    "text",
    [
        "<|det|>[[" + "9" * 100_000 + "]]<|/det|>",
        "<|det|>[[" + "9" * 100_000,
        "<|det|>" + "[" * 50_000 + "1" * 50_000 + "]" * 10,
        "<|ref|>" * 15_000,
        "<|det|>" * 15_000,
        "<|" * 50_000 + "<|/det|>",
        "<|det|>[[" + "1," * 50_000 + "]]<|/det|>",
        "<|det|>" + "[1,2,3]," * 12_000 + "<|/det|>",
        "<|ref|>" + "a" * 100_000 + "<|/ref|>",
    ],
    ids=[
        "runaway-digits",
        "runaway-digits-unclosed",
        "deep-brackets",
        "unclosed-refs",
        "unclosed-dets",
        "tag-starts",
        "huge-box",
        "many-short-boxes",
        "huge-lonely-ref",
    ],
)
def test_adversarial_input_completes(text):
    result = parse_grounding(text, 640, 480)
    assert result.boxes == []
    assert result.rejected
    assert all(len(r.text) <= 200 for r in result.rejected)
    assert strip_grounding_tags(text) is not None
    parser = StreamingGroundingParser(640, 480)
    for start in range(0, len(text), 997):
        parser.feed(text[start : start + 997])
    assert parser.finish() == result


def test_rejected_text_is_truncated():
    result = parse_grounding("<|det|>[[1,2,3," + "4" * 300 + "]]<|/det|>", 999, 999)
    (rejected,) = result.rejected
    assert len(rejected.text) == 200
    assert rejected.reason == "runaway number with 300 digits (at most 4)"
    assert rejected.span[1] - rejected.span[0] == len("[1,2,3,") + 300 + 1


# --- serialisation and arguments -----------------------------------------------------------------


def test_to_dict_is_json_serialisable():
    result = parse_grounding(GROUNDED + "<|ref|>猫<|/ref|><|det|>[[1,2,3]]<|/det|><|ref|>x", 640, 480)
    document = json.loads(json.dumps(result.to_dict(), ensure_ascii=False))
    assert set(document) == {"boxes", "rejected"}
    assert document["boxes"][0] == {
        "label": "dog",
        "xyxy": [0.64, 0.96, 1.92, 1.92],
        "norm999": [1, 2, 3, 4],
        "ref_index": 0,
        "span": [17, 35],
    }
    assert [r["reason"] for r in document["rejected"]] == ["box has 3 numbers, expected 4", "unclosed <|ref|>"]
    assert Rejected("t", "r", (1, 2)).to_dict() == {"text": "t", "reason": "r", "span": [1, 2]}


@pytest.mark.parametrize(("width", "height"), [(0, 480), (640, 0), (-1, 480), (640.0, 480), (True, 480), ("640", 480)])
def test_bad_image_size_is_a_value_error(width, height):
    with pytest.raises(ValueError, match="must be a positive integer"):
        parse_grounding("<|det|>[[1,2,3,4]]<|/det|>", width, height)
    with pytest.raises(ValueError, match="must be a positive integer"):
        StreamingGroundingParser(width, height)
