"""Hostile clients against a served app on loopback: what is refused, what it costs the server.

    python -m bench.attack [--clients 8] [--rounds 10]

Starts ``python app.py --backend scripted`` on 127.0.0.1 (the model is not what is attacked here),
sends hand-written JSON to ``/gradio_api/call/...``, and prints one row per attack (outcome, time)
and the server's RSS (current and peak) and private folder's disk use before and after. Numbers
are printed, never asserted; tests/test_public_safety.py asserts the behaviour.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FILE_DATA = {"_type": "gradio.FileData"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _call(url: str, name: str, data: list, headers: dict | None = None) -> str:
    response = httpx.post(f"{url}/gradio_api/call/{name}", json={"data": data}, headers=headers, timeout=300)
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    event_id = response.json()["event_id"]
    kind = "?"
    with httpx.stream("GET", f"{url}/gradio_api/call/{name}/{event_id}", timeout=300) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind in ("complete", "error"):
                if kind == "error":
                    message = (json.loads(line.removeprefix("data: ")) or {}).get("error")
                    return f"refused: {(message or 'null')[:70]}"
                return "answered"
    return kind


def _upload(url: str, path: Path) -> dict:
    response = httpx.post(f"{url}/gradio_api/upload", files={"files": (path.name, path.read_bytes())}, timeout=120)
    return {"path": response.json()[0], "meta": FILE_DATA}


def _memory(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) // 1024, int(fields["VmHWM"].split()[0]) // 1024


def _disk(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vl2-attack-"))
    temp = work / "tmp"
    temp.mkdir()
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(temp), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    env.pop("GRADIO_TEMP_DIR", None)
    server = subprocess.Popen(
        [sys.executable, "app.py", "--backend", "scripted", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in iter(server.stdout.readline, ""):
            if "Running on local URL" in line:
                break
        url = f"http://127.0.0.1:{port}"
        secret = work / "host-secret.png"
        Image.new("RGB", (64, 48), "red").save(secret)
        big = work / "big.png"
        Image.new("RGB", (8000, 8000), (30, 60, 90)).save(big, compress_level=1)
        strip = work / "strip.png"
        Image.new("L", (64_000_000, 1), 255).save(strip)
        small = work / "small.png"
        Image.new("RGB", (640, 480), "grey").save(small)
        uploads = {name: _upload(url, path) for name, path in (("big", big), ("strip", strip), ("small", small))}
        history = [{"role": "user", "content": "q", "images": [uploads["big"]] * 8}] * 8
        attacks = {
            "path probe, bare string": ("annotate", [str(secret), []]),
            "path probe, {path} dict": ("annotate", [{"path": str(secret)}, []]),
            "path probe, FileData outside uploads": ("annotate", [{"path": str(secret), "meta": FILE_DATA}, []]),
            "path probe, missing file": ("annotate", [{"path": str(work / "nope.png")}, []]),
            "history: 8000×8000 × 64 references": ("chat", ["q", [], history, "Ask", 16, 0]),
            "1×64,000,000 PNG": ("annotate", [uploads["strip"], []]),
            "100,000 boxes": ("annotate", [uploads["small"], [{"label": "x", "xyxy": [1, 2, 3, 4]}] * 100_000]),
            "temperature 1e-300": ("chat", ["q", [], [], "Ask", 16, 1e-300]),
            "typed <image>": ("chat", ["<image> q", [], [], "Ask", 16, 0]),
            "Host: rebind.attacker.example": ("to_coco", [{}], {"Host": "rebind.attacker.example"}),
            "Origin: http://localhost:3000": ("to_coco", [{}], {"Origin": "http://localhost:3000"}),
            "1000 boxes on a 64 MP image (allowed)": (
                "annotate",
                [uploads["big"], [{"label": "object", "xyxy": [10, 10, 7000, 7000]}] * 1000],
            ),
        }
        storage = next(temp.glob("vl2-studio-*"))
        rss_before, peak_before = _memory(server.pid)
        disk_before = _disk(temp)
        print(f"server before: RSS {rss_before} MiB (peak {peak_before}), disk {disk_before} KiB ({storage.name})")
        print(f"{'attack':42} {'seconds':>8}  outcome")
        for name, (endpoint, data, *headers) in attacks.items():
            started = time.monotonic()
            outcome = _call(url, endpoint, data, headers[0] if headers else None)
            print(f"{name:42} {time.monotonic() - started:8.2f}  {outcome}")
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            jobs = [
                pool.submit(_call, url, "chat", ["thing", [uploads["small"]], [], "Find", 16, 0])
                for _ in range(args.clients * args.rounds)
            ]
            outcomes = [job.result() for job in jobs]
        answered = sum(o == "answered" for o in outcomes)
        print(
            f"{args.clients} clients × {args.rounds} /chat requests: {answered} answered, "
            f"{len(outcomes) - answered} other, {time.monotonic() - started:.1f} s"
        )
        rss_after, peak_after = _memory(server.pid)
        print(f"server after: RSS {rss_after} MiB (peak {peak_after}), disk {_disk(temp)} KiB")
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"after exit: {sum(1 for _ in temp.iterdir())} entries left in the server's temp dir")


if __name__ == "__main__":
    main()
