"""The served app: gradio_client round trips, ``python app.py`` on a generated checkpoint."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file

from app.backends.scripted import ScriptedBackend

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
