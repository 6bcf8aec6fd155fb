"""Dataset exports: COCO loads in pycocotools, YOLO lines and data.yaml, Label Studio tasks, JSON lines."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from app.label.formats import (
    coco,
    data_yaml,
    jsonl_lines,
    label_studio,
    label_studio_config,
    write_exports,
    write_yolo,
)
from app.label.records import ImageRecord, LabelBox, PhraseResult

try:  # the dataset file is read back as YOLO tools read it, with PyYAML, wherever it is installed
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with most stacks; the JSON reading still checks
    yaml = None

PHRASES = ["cat", "dog"]
ODD_PHRASES = [
    'a "quoted" cat',
    "key: value",
    "- dash first",
    "#hash, [brackets] {braces}",
    "naïve café 猫 🐈",
    "back\\slash\ttab",
    "yes",
    "null",
    "  padded  ",
    "line\u2028sep\x85nel",
]


def _records() -> list[ImageRecord]:
    cat = LabelBox("cat", (10.0, 20.0, 50.0, 60.0), (15, 41, 78, 124))
    dog = LabelBox("dog", (0.0, 0.0, 640.0, 480.0), (0, 0, 999, 999))
    return [
        ImageRecord(
            key="a/one.jpg",
            name="one.jpg",
            status="done",
            width=640,
            height=480,
            results=(
                PhraseResult("cat", "<|ref|>cat<|/ref|><|det|>[[15, 41, 78, 124]]<|/det|>", (cat,)),
                PhraseResult("dog", "<|ref|>dog<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>", (dog,)),
            ),
        ),
        ImageRecord(key="b/broken.jpg", name="broken.jpg", status="skipped", reason="cannot identify image file"),
        ImageRecord(
            key="b/two.png",
            name="two.png",
            status="done",
            width=100,
            height=50,
            results=(PhraseResult("cat", "no cat here"), PhraseResult("dog", "none")),
        ),
    ]


NAMES = {"a/one.jpg": "a_one.jpg", "b/two.png": "b_two.png"}


def test_coco_loads_in_pycocotools_with_one_image_per_done_record(tmp_path: Path):
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco(_records(), PHRASES, file_names=NAMES)), encoding="utf-8")
    api = COCO(str(path))

    assert sorted(api.imgs) == [1, 2]  # the skipped record is not an image
    assert api.imgs[1] == {"id": 1, "file_name": "a_one.jpg", "width": 640, "height": 480}
    assert api.imgs[2]["file_name"] == "b_two.png"
    assert [api.cats[i]["name"] for i in sorted(api.cats)] == PHRASES
    assert api.cats[1]["supercategory"] == "object"

    (cat_ann,) = api.loadAnns(api.getAnnIds(imgIds=[1], catIds=[1]))
    assert cat_ann["bbox"] == [10.0, 20.0, 40.0, 40.0]
    assert cat_ann["area"] == 1600.0
    assert cat_ann["iscrowd"] == 0
    assert "score" not in cat_ann
    (dog_ann,) = api.loadAnns(api.getAnnIds(imgIds=[1], catIds=[2]))
    assert dog_ann["bbox"] == [0.0, 0.0, 640.0, 480.0]
    assert api.getAnnIds(imgIds=[2]) == []
    assert len({ann["id"] for ann in api.dataset["annotations"]}) == 2


def test_coco_file_names_default_to_the_record_name():
    document = coco(_records(), PHRASES)
    assert [image["file_name"] for image in document["images"]] == ["one.jpg", "two.png"]


def test_boxes_are_clamped_and_rounded():
    record = ImageRecord(
        "k",
        "k.jpg",
        "done",
        100,
        100,
        (PhraseResult("cat", "", (LabelBox("cat", (-3.0, 10.123, 104.0, 20.456), (0, 0, 999, 999)),)),),
    )
    (annotation,) = coco([record], ["cat"])["annotations"]
    assert annotation["bbox"] == [0.0, 10.12, 100.0, 10.33]


def test_a_label_outside_the_phrases_or_a_repeated_phrase_is_refused():
    with pytest.raises(ValueError, match="not one of the job's phrases"):
        coco(_records(), ["cat"])
    with pytest.raises(ValueError, match="listed twice"):
        coco(_records(), ["cat", "dog", "cat"])


def test_yolo_labels_and_data_yaml(tmp_path: Path):
    written = write_yolo(_records(), PHRASES, tmp_path, image_names=NAMES)

    assert written == [tmp_path / "labels" / "a_one.txt", tmp_path / "labels" / "b_two.txt", tmp_path / "data.yaml"]
    lines = (tmp_path / "labels" / "a_one.txt").read_text().splitlines()
    # cat: centre (30, 40) of 640×480, size 40×40.
    assert lines == ["0 0.046875 0.083333 0.062500 0.083333", "1 0.500000 0.500000 1.000000 1.000000"]
    assert (tmp_path / "labels" / "b_two.txt").read_text() == ""  # a negative: an image with nothing
    assert not (tmp_path / "labels" / "broken.txt").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    data = _read_data_yaml((tmp_path / "data.yaml").read_text(encoding="utf-8"))
    assert data == {"path": ".", "train": "images", "val": "images", "nc": 2, "names": PHRASES}


def test_data_yaml_names_survive_odd_phrases():
    data = _read_data_yaml(data_yaml(ODD_PHRASES))
    assert data["nc"] == len(ODD_PHRASES)
    assert data["names"] == ODD_PHRASES
    assert _read_data_yaml(data_yaml([]))["names"] == []


def test_data_yaml_is_also_json_per_name():
    """Each name line is a JSON string as well, for readers without a YAML parser."""
    text = data_yaml(ODD_PHRASES)
    names = [json.loads(line[len("  - ") :]) for line in text.splitlines() if line.startswith("  - ")]
    assert names == ODD_PHRASES


def _read_data_yaml(text: str) -> dict:
    if yaml is not None:
        return yaml.safe_load(text)
    # Without PyYAML: the flat keys this writer emits, names one JSON string per line.
    data: dict = {"names": []}
    for line in text.splitlines():
        if line.startswith("  - "):
            data["names"].append(json.loads(line[4:]))
        elif ": " in line and not line.startswith("#"):
            key, value = line.split(": ", 1)
            data[key] = [] if value == "[]" else int(value) if value.isdigit() else value
    return data


def test_yolo_refuses_two_images_with_one_stem(tmp_path: Path):
    with pytest.raises(ValueError, match="share the label file"):
        write_yolo(_records(), PHRASES, tmp_path, image_names={"a/one.jpg": "x.jpg", "b/two.png": "x.png"})


def test_label_studio_tasks_in_percent():
    urls = {key: f"images/{name}" for key, name in NAMES.items()}
    tasks = label_studio(_records(), PHRASES, image_urls=urls)

    assert [task["data"] for task in tasks] == [{"image": "images/a_one.jpg"}, {"image": "images/b_two.png"}]
    (prediction,) = tasks[0]["predictions"]
    assert prediction["model_version"] == "deepseek-vl2"
    cat, dog = prediction["result"]
    assert cat["type"] == "rectanglelabels"
    assert (cat["from_name"], cat["to_name"]) == ("label", "image")
    assert (cat["original_width"], cat["original_height"], cat["image_rotation"]) == (640, 480, 0)
    assert cat["value"]["x"] == pytest.approx(10 / 640 * 100, abs=1e-4)
    assert cat["value"]["y"] == pytest.approx(20 / 480 * 100, abs=1e-4)
    assert cat["value"]["width"] == pytest.approx(40 / 640 * 100, abs=1e-4)
    assert cat["value"]["height"] == pytest.approx(40 / 480 * 100, abs=1e-4)
    assert cat["value"]["rotation"] == 0
    assert cat["value"]["rectanglelabels"] == ["cat"]
    assert dog["value"] == {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0, "rectanglelabels": ["dog"]}
    assert cat["id"] != dog["id"]
    assert tasks[1]["predictions"][0]["result"] == []


def test_label_studio_config_lists_the_phrases_escaped():
    root = ET.fromstring(label_studio_config([*ODD_PHRASES, "<b>&amp;'</b>"]))
    image = root.find("Image")
    assert image is not None and image.attrib == {"name": "image", "value": "$image"}
    rectangles = root.find("RectangleLabels")
    assert rectangles is not None and rectangles.attrib == {"name": "label", "toName": "image"}
    assert [label.get("value") for label in rectangles.iter("Label")] == [*ODD_PHRASES, "<b>&amp;'</b>"]


def test_jsonl_lines_round_trip_every_record():
    records = _records()
    lines = list(jsonl_lines(records))
    assert len(lines) == 3
    assert all("\n" not in line for line in lines)
    assert [ImageRecord.from_dict(json.loads(line)) for line in lines] == records
    assert json.loads(lines[1])["reason"] == "cannot identify image file"
    assert "<|det|>[[15, 41, 78, 124]]" in json.loads(lines[0])["results"][0]["raw_text"]


def test_write_exports_writes_each_chosen_format(tmp_path: Path):
    written = write_exports(_records(), PHRASES, tmp_path, ["coco", "yolo", "labelstudio", "jsonl"], image_names=NAMES)

    assert written == {
        "coco": tmp_path / "coco.json",
        "yolo": tmp_path / "data.yaml",
        "yolo_labels": tmp_path / "labels",
        "labelstudio": tmp_path / "labelstudio.json",
        "labelstudio_config": tmp_path / "labelstudio_config.xml",
        "jsonl": tmp_path / "labels.jsonl",
    }
    assert all(path.exists() for path in written.values())
    assert not list(tmp_path.rglob("*.tmp"))
    assert COCO(str(written["coco"])).imgs[1]["file_name"] == "a_one.jpg"
    tasks = json.loads(written["labelstudio"].read_text(encoding="utf-8"))
    assert tasks[0]["data"]["image"] == "images/a_one.jpg"
    assert len(written["jsonl"].read_text(encoding="utf-8").splitlines()) == 3


def test_label_studio_export_encodes_image_urls(tmp_path: Path):
    names = {"a/one.jpg": "my cat #1.jpg", "b/two.png": "two.png"}
    written = write_exports(_records(), PHRASES, tmp_path, ["labelstudio"], image_names=names)
    tasks = json.loads(written["labelstudio"].read_text(encoding="utf-8"))
    assert [task["data"]["image"] for task in tasks] == ["images/my%20cat%20%231.jpg", "images/two.png"]


def test_write_exports_only_the_chosen_and_refuses_unknown(tmp_path: Path):
    assert write_exports(_records(), PHRASES, tmp_path, ["jsonl"], image_names=NAMES) == {
        "jsonl": tmp_path / "labels.jsonl"
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.jsonl"]
    with pytest.raises(ValueError, match="unknown export format"):
        write_exports(_records(), PHRASES, tmp_path / "x", ["coco", "voc"], image_names=NAMES)
    assert not (tmp_path / "x").exists()
