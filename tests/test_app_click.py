"""Click-to-ground, the box panel's edits, and exports (JSON schema, COCO, PNG) without a browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from app.backends.scripted import ScriptedBackend
from app.click import NAME_PROMPT, clean_name, crop_around, pick_box
from app.controller import Controller
from app.exports import SCHEMA, coco_from_document, session_document
from app.modes import Mode
from app.session import Session
from model.generation import GenerationSettings
from model.grounding import parse_grounding

from .app_support import BACKGROUND, solid_image


def click_script(name: str, det: str):
    """First call names the crop, second grounds the name (as the real model would be asked)."""

    def script(conversation):
        prompt = conversation[-1].text
        if prompt == NAME_PROMPT:
            return f"A {name}."
        return f"<|ref|>{name}<|/ref|><|det|>{det}<|/det|>"

    return script


def setup(tmp_path, script, size=(1000, 500)):
    backend = ScriptedBackend(script)
    controller, session = Controller(backend, image_dir=tmp_path / "images"), Session()
    controller.ingest(session, [solid_image(tmp_path / "photo.png", size)])
    return backend, controller, session


def test_the_chosen_box_contains_the_click(tmp_path):
    # two dogs; the click is on the second one
    backend, controller, session = setup(tmp_path, click_script("dog", "[[100, 100, 300, 600], [600, 200, 900, 800]]"))
    result = controller.identify_click(session, "img1", (750.0, 250.0))
    x1, y1, x2, y2 = result.box.xyxy
    assert x1 <= 750 <= x2 and y1 <= 250 <= y2
    assert result.label == "dog" and result.contains_point and not result.from_cache and result.notice is None
    # the model was asked about a crop centred on the click, then grounded the name on the full image
    (name_call,), (find_call,) = backend.conversations
    assert name_call.text == NAME_PROMPT and name_call.images[0].size == (200, 200)
    assert find_call.text == "<|ref|>dog<|/ref|>." and find_call.images[0].size == (1000, 500)
    # it joins the conversation and the box panel, with a pin
    turn = session.turns[-1]
    assert turn.kind == "click" and turn.boxes == [result.box.__class__(**{**result.box.__dict__, "label": "dog"})]
    assert session.pins["img1"] == [(750.0, 250.0)]
    assert session.numbered_boxes()[0][3].label == "dog"
    assert all(m.text != turn.prompt for m in session.messages())  # clicks are not replayed to the model


def test_nearest_box_is_used_and_said_when_no_box_contains_the_click(tmp_path):
    _backend, controller, session = setup(tmp_path, click_script("cup", "[[0, 0, 100, 100], [800, 800, 999, 999]]"))
    result = controller.identify_click(session, "img1", (980.0, 300.0))
    assert not result.contains_point
    assert result.box.norm999 == (800, 800, 999, 999)
    assert "nearest" in result.notice


def test_no_box_at_all_falls_back_to_the_described_area(tmp_path):
    _backend, controller, session = setup(
        tmp_path, lambda conv: "something" if conv[-1].text == NAME_PROMPT else "none"
    )
    result = controller.identify_click(session, "img1", (500.0, 250.0))
    x1, y1, x2, y2 = result.box.xyxy
    assert x1 <= 500 <= x2 and y1 <= 250 <= y2
    assert "no box" in result.notice


def test_a_second_click_inside_a_known_box_is_answered_from_the_cache(tmp_path):
    backend, controller, session = setup(tmp_path, click_script("lamp", "[[100, 100, 400, 900], [500, 100, 900, 900]]"))
    controller.identify_click(session, "img1", (200.0, 200.0))
    calls = len(backend.conversations)
    second = controller.identify_click(session, "img1", (700.0, 300.0))  # the other lamp, found by the first call
    assert second.from_cache and second.label == "lamp" and len(backend.conversations) == calls
    assert second.box.norm999 == (500, 100, 900, 900)
    assert len(session.turns) == 2 and len(session.pins["img1"]) == 2


def test_boxes_from_a_find_answer_clicks_too(tmp_path):
    backend, controller, session = setup(tmp_path, "<|ref|>kite<|/ref|><|det|>[[10, 10, 500, 500]]<|/det|>")
    turn = controller.begin(session, "kite", Mode.FIND)
    list(controller.run_turn(session, turn, GenerationSettings()))
    result = controller.identify_click(session, "img1", (100.0, 100.0))
    assert result.from_cache and result.label == "kite" and len(backend.conversations) == 1


def test_click_outside_the_image_is_refused(tmp_path):
    _backend, controller, session = setup(tmp_path, click_script("x", "[[0, 0, 1, 1]]"))
    with pytest.raises(ValueError, match="outside"):
        controller.identify_click(session, "img1", (1000.0, 10.0))


@pytest.mark.parametrize(
    ("text", "name"),
    [("A red car.", "red car"), ("the cat\nIt is sitting.", "cat"), ("<|ref|>dog<|/ref|>", "dog"), ("", "object")],
)
def test_names_are_cleaned(text, name):
    assert clean_name(text) == name


def test_crop_stays_inside_the_image():
    image = Image.new("RGB", (300, 1000), BACKGROUND)
    crop, (left, top, right, _bottom) = crop_around(image, 290, 5)
    assert crop.size == (160, 160) and right <= 300 and top == 0 and left == 140


def test_pick_box_prefers_the_smallest_containing_box():
    boxes = parse_grounding("<|det|>[[0, 0, 999, 999], [400, 400, 600, 600]]<|/det|>", 1000, 1000).boxes
    chosen, inside = pick_box(boxes, 500, 500)
    assert inside and chosen.norm999 == (400, 400, 600, 600)


def test_box_panel_edits(tmp_path):
    _backend, controller, session = setup(tmp_path, "<|ref|>a<|/ref|><|det|>[[1, 1, 9, 9], [20, 20, 30, 30]]<|/det|>")
    turn = controller.begin(session, "a", Mode.FIND)
    list(controller.run_turn(session, turn, GenerationSettings()))
    assert session.label_counts() == {"a": 2}
    assert session.select_number(2) and session.selected_box().norm999 == (20, 20, 30, 30)
    session.rename_selected("b")
    assert session.label_counts() == {"a": 1, "b": 1}
    session.hidden_labels = {"a"}
    assert [box.label for _t, box in session.boxes_on("img1", visible_only=True)] == ["b"]
    session.delete_selected()
    assert session.label_counts() == {"a": 1} and session.selected is None
    assert not session.select_number(5)


def test_exports_follow_the_documented_schema(tmp_path):
    backend, controller, session = setup(
        tmp_path, "<|ref|>cat<|/ref|><|det|>[[100, 200, 300, 400]]<|/det|>", size=(640, 480)
    )
    turn = controller.begin(session, "cat", Mode.FIND)
    list(controller.run_turn(session, turn, GenerationSettings()))
    document = json.loads(Path(controller.export_json(session)).read_text(encoding="utf-8"))
    assert document["schema"] == SCHEMA
    assert document["model"] == {"id": "scripted", "precision": "n/a", "device": "cpu"}
    assert document["images"] == [{"index": 0, "name": "photo.png", "width": 640, "height": 480}]
    (exported_turn,) = document["turns"]
    assert exported_turn["prompt"] == "<|ref|>cat<|/ref|>." and exported_turn["raw_text"] == turn.reply
    (box,) = exported_turn["boxes"]
    assert box == {"id": 1, "label": "cat", "image_index": 0, "xyxy": [64.06, 96.1, 192.19, 192.19],
                   "norm999": [100, 200, 300, 400]}  # fmt: skip
    coco = json.loads(Path(controller.export_coco(session)).read_text(encoding="utf-8"))
    assert coco == coco_from_document(session_document(session, backend.info))
    png = Image.open(controller.export_png(session))
    assert png.size == (640, 480)
    assert png.getpixel((128, 192)) == session.colors.color("cat")  # bottom edge, full resolution


def test_coco_output_loads_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    _backend, controller, session = setup(
        tmp_path,
        "<|ref|>a<|/ref|><|det|>[[0, 0, 500, 500]]<|/det|> <|ref|>b<|/ref|><|det|>[[500, 500, 999, 999]]<|/det|>",
    )
    turn = controller.begin(session, "<|grounding|>two things", Mode.ASK)
    list(controller.run_turn(session, turn, GenerationSettings()))
    coco = COCO(controller.export_coco(session))
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == ["a", "b"]
    (annotation,) = coco.loadAnns(coco.getAnnIds(catIds=coco.getCatIds(catNms=["b"])))
    assert annotation["image_id"] == 1 and annotation["bbox"][2] == pytest.approx(499.5, abs=0.01)
