"""The served app: gradio_client round trips, ``python app.py`` on a generated checkpoint."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app.backends.scripted import ScriptedBackend
from app.render import ColorBook

from .app_support import find_reply, free_port, running_app, solid_image

ROOT = Path(__file__).resolve().parents[1]


def test_chat_round_trip_streams_text_and_boxes(tmp_path):
    backend = ScriptedBackend(find_reply("cat", (100, 200, 300, 400)) + " done")
    image = solid_image(tmp_path / "cat.png", (640, 480))
    with running_app(backend, tmp_path) as url:
        client = Client(url, verbose=False)
        job = client.submit("the cat", [handle_file(str(image))], [], "Find", 64, 0.0, api_name="/chat")
        partials = list(job)
        final = job.result()
    assert final["done"] is True and final["error"] is None
    assert final["raw"] == find_reply("cat", (100, 200, 300, 400)) + " done"
    assert final["text"].strip() == "cat done"
    (box,) = final["boxes"]
    assert box["label"] == "cat" and box["norm999"] == [100, 200, 300, 400] and box["image_index"] == 0
    assert box["xyxy"] == [64.06, 96.1, 192.19, 192.19]
    assert len(partials) > 2, "the reply must arrive in pieces"
    (message,) = backend.conversations[-1]
    assert message.text == "<|ref|>the cat<|/ref|>." and message.images[0].size == (640, 480)


def test_chat_api_keeps_history_and_reports_bad_input(tmp_path):
    backend = ScriptedBackend("second answer")
    image = solid_image(tmp_path / "a.png", (300, 200))
    with running_app(backend, tmp_path) as url:
        client = Client(url, verbose=False)
        history = [
            {"role": "user", "content": "What is it?", "images": [handle_file(str(image))]},
            {"role": "assistant", "content": "A grey square."},
        ]
        result = client.predict("And its colour?", [], history, "Ask", 32, 0.0, api_name="/chat")
        assert result["text"] == "second answer"
        roles = [(m.role, m.text, len(m.images)) for m in backend.conversations[-1]]
        assert roles == [("user", "What is it?", 1), ("assistant", "A grey square.", 0), ("user", "And its colour?", 0)]
        empty = client.submit("   ", [], [], "Ask", 32, 0.0, api_name="/chat")
        try:
            empty.result()
            raised = None
        except Exception as exc:  # gradio_client raises AppError carrying our message
            raised = str(exc)
        assert raised is not None and "Type a question" in raised


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


def test_app_py_help():
    result = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for flag in ("--model", "--quantization", "--device", "--host", "--port", "--share"):
        assert flag in result.stdout


def test_app_py_serves_a_generated_checkpoint_and_answers(checkpoints):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    env["VL2_CPU_KERNELS"] = "eager"  # compiled kernels are tested elsewhere; compiling here would be most of the run
    command = [sys.executable, "app.py", "--model", str(checkpoints["tiny"]), "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(process.stdout, lines), daemon=True).start()
    seen = []
    try:
        url = None
        while url is None:
            line = lines.get(timeout=180)
            assert line is not None, "app.py exited:\n" + "".join(seen)
            seen.append(line)
            if "Running on local URL" in line:
                url = line.split("URL:")[1].strip()
        assert url == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.status == 200
            assert "VL2 Grounding Studio" in response.read().decode()
        result = Client(url, verbose=False).predict("Hello there", [], [], "Ask", 8, 0.0, api_name="/chat")
        assert result["done"] is True and result["error"] is None and isinstance(result["raw"], str)
    finally:
        process.terminate()
        process.wait(timeout=60)


def _click_script(conversation):
    prompt = conversation[-1].text
    if prompt.startswith("What is the object"):
        return "A grey square."
    return "<|ref|>grey square<|/ref|><|det|>[[100, 200, 300, 400]]<|/det|>"


@pytest.mark.parametrize(
    ("stored", "orientation", "seen"),
    [((640, 480), None, (640, 480)), ((300, 500), None, (300, 500)), ((500, 300), 6, (300, 500))],
)
def test_typed_api_ground_identify_and_exports(tmp_path, stored, orientation, seen):
    image = solid_image(tmp_path / "photo.jpg", stored, exif_orientation=orientation)
    width, height = seen
    expected = [round(100 / 999 * width, 2), round(200 / 999 * height, 2), round(300 / 999 * width, 2),
                round(400 / 999 * height, 2)]  # fmt: skip
    with running_app(ScriptedBackend(_click_script), tmp_path) as url:
        client = Client(url, verbose=False)
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
        assert {"/chat", "/ground", "/identify", "/to_coco", "/annotate"} <= set(api)
        grounded = client.predict(handle_file(str(image)), "grey square", 128, api_name="/ground")
        (box,) = grounded["boxes"]
        assert box["label"] == "grey square" and box["norm999"] == [100, 200, 300, 400]
        assert box["xyxy"] == expected
        assert grounded["document"]["images"][0]["width"] == width
        assert grounded["document"]["images"][0]["height"] == height
        x, y = (expected[0] + expected[2]) / 2, (expected[1] + expected[3]) / 2
        identified = client.predict(handle_file(str(image)), x, y, api_name="/identify")
        assert identified["label"] == "grey square" and identified["contains_point"] is True
        assert identified["box"]["xyxy"] == expected
        coco = client.predict(grounded["document"], api_name="/to_coco")
        assert coco["images"] == [{"id": 1, "file_name": "photo.jpg", "width": width, "height": height}]
        assert coco["annotations"][0]["bbox"][:2] == expected[:2]
        png_path = client.predict(handle_file(str(image)), grounded["boxes"], api_name="/annotate")
    drawn = Image.open(png_path)
    assert drawn.size == seen
    color = ColorBook().color("grey square")
    assert drawn.getpixel((round((expected[0] + expected[2]) / 2), round(expected[3]))) == color


def test_identify_outside_the_image_is_a_clear_error(tmp_path):
    image = solid_image(tmp_path / "p.png", (100, 100))
    with running_app(ScriptedBackend(_click_script), tmp_path) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="outside"):
            client.predict(handle_file(str(image)), 150, 10, api_name="/identify")


def test_label_endpoint_returns_a_coco_dataset_and_records(tmp_path):
    from pycocotools.coco import COCO

    photos = [solid_image(tmp_path / f"photo{i}.png", (200 + 40 * i, 120)) for i in range(3)]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    script = lambda conversation: find_reply(conversation[-1].text.split("|>")[1].split("<|")[0], (100, 200, 300, 400))  # noqa: E731
    with running_app(ScriptedBackend(script), tmp_path) as url:
        client = Client(url, verbose=False)
        files = [handle_file(str(p)) for p in [*photos, tmp_path / "broken.png", photos[0]]]
        result = client.predict(files, ["grey square", "shadow"], 64, api_name="/label")
        with pytest.raises(Exception, match="phrase is blank"):
            client.predict([handle_file(str(photos[0]))], ["  "], 64, api_name="/label")
        with pytest.raises(Exception, match="plain words"):
            client.predict([handle_file(str(photos[0]))], ["<|det|>"], 64, api_name="/label")
    coco_path = tmp_path / "coco.json"
    coco_path.write_text(json.dumps(result["coco"]))
    coco = COCO(str(coco_path))
    assert [c["name"] for c in coco.dataset["categories"]] == ["grey square", "shadow"]
    names = [image["file_name"] for image in coco.dataset["images"]]
    assert names == ["photo0.png", "photo1.png", "photo2.png", "photo0-2.png"]  # one per readable input
    assert len(coco.getAnnIds()) == 8
    assert [r["status"] for r in result["records"]] == ["done", "done", "done", "skipped", "done"]
    assert result["records"][3]["reason"]
    first = result["records"][1]["results"][0]
    assert first["phrase"] == "grey square" and first["boxes"][0]["xyxy"] == [
        round(100 / 999 * 240, 2),
        round(200 / 999 * 120, 2),
        round(300 / 999 * 240, 2),
        round(400 / 999 * 120, 2),
    ]


def test_mcp_serves_the_endpoints_as_tools(tmp_path):
    import httpx

    with running_app(ScriptedBackend("ok"), tmp_path, mcp=True) as url:
        schema = httpx.get(url.rstrip("/") + "/gradio_api/mcp/schema", timeout=30).json()
    tools = {tool["name"]: tool for tool in schema}
    assert {"ground", "identify", "label"} <= set(tools)
    assert "phrases" in tools["label"]["inputSchema"]["properties"]
    assert tools["ground"]["description"].startswith("Boxes for a phrase")
