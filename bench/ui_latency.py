"""How fast the page answers a user, measured in a real browser (Debian's Chromium via Playwright).

    python -m bench.ui_latency [--rounds 3] [--flood 500]

The app runs in-process on a scripted backend whose tokens the bench releases itself, so each
time below is the page's own cost (Gradio, the browser, our handlers), not the model's:

- page to interactive: navigation start to the canvas script ready with the examples shown;
- attach to image visible: an image attached to the prompt until the canvas shows it (not sent yet);
- send to image on canvas: Enter until the canvas shows the server's (EXIF-corrected, browser-sized)
  copy of the image, with no token generated yet (the model is still "thinking");
- ``<|/det|>`` to box visible: the token that closes a box released until the box is on the canvas;
- a flood: a message with the 12 MP photo, answered by a backend that emits ``--flood`` tokens at
  once, then 5 every 20 ms (250 tokens/s, a fast server): Enter until Stop shows, Enter until the
  burst's last token shows, and Stop pressed until the answer says "stopped" — with the page's
  stream coalescing on (as shipped) and off (an update per token), paired in the same run.

Medians over ``--rounds``; numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from PIL import Image
from playwright.sync_api import Page, sync_playwright

import app.ui
from app.backends.scripted import ScriptedBackend, split_into_pieces
from app.ui import build_demo, launch_options

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FIND = "<|ref|>the square<|/ref|><|det|>[[250, 250, 750, 750]]<|/det|>"


@contextlib.contextmanager
def served(backend: ScriptedBackend, folder: Path) -> Iterator[str]:
    demo = build_demo(backend, image_dir=folder / "images")
    demo.queue(max_size=16)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **launch_options())
    try:
        yield url
    finally:
        demo.close()


class Pump:
    """Feeds a gated backend: ``burst`` tokens at once, then ``trickle`` every 20 ms (a fast server)."""

    def __init__(self, gate: threading.Semaphore, burst: int, trickle: int = 5, period: float = 0.02) -> None:
        self.gate, self.burst, self.trickle, self.period = gate, burst, trickle, period
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        for _ in range(self.burst):
            self.gate.release()
        while not self.stopped.wait(self.period):
            for _ in range(self.trickle):
                self.gate.release()

    def __enter__(self) -> Pump:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()


def ready(page: Page, url: str) -> float:
    page.goto(url)
    page.wait_for_function("() => window.vl2Canvas && document.querySelector('#vl2-canvas .vl2-example')")
    return page.evaluate("performance.now()") / 1000


def attach(page: Page, image: Path) -> float:
    start = time.perf_counter()
    page.locator("#prompt input[type=file]").set_input_files(str(image))
    page.wait_for_function("() => document.querySelector('#vl2-canvas .vl2-img')?.naturalWidth > 0")
    return time.perf_counter() - start


def press_enter(page: Page, text: str) -> None:
    box = page.locator("#prompt textarea")
    box.fill(text)
    page.wait_for_function("() => !document.querySelector('#prompt button.submit-button')?.disabled")
    box.press("Enter")


def send_until_image(page: Page) -> float:
    start = time.perf_counter()
    press_enter(page, "the square")
    page.wait_for_function(
        "() => { const i = document.querySelector('#vl2-canvas .vl2-img');"
        " return i && i.src.includes('vl2-views') && i.complete && i.naturalWidth > 0; }"
    )
    return time.perf_counter() - start


def det_to_box(page: Page, backend: ScriptedBackend, gate: threading.Semaphore, before_close: int) -> float:
    for _ in range(before_close):
        gate.release()
    while not backend.records:  # the reply has started
        threading.Event().wait(0.002)
    record = backend.records[-1]
    while record.pieces_sent < before_close:  # the backend has emitted everything up to the close
        threading.Event().wait(0.002)
    page.wait_for_timeout(300)  # and the page has had time to show it
    start = time.perf_counter()
    gate.release()  # the "<|/det|>" piece
    page.locator('#vl2-canvas [data-box-index="1"]').wait_for()
    return time.perf_counter() - start


def stop_under_flood(page: Page, backend: ScriptedBackend, burst: int, image: Path) -> tuple[float, float, float]:
    gate = threading.Semaphore(0)
    backend.gate = gate
    page.locator("#prompt input[type=file]").set_input_files(str(image))  # the photo is in the conversation
    with Pump(gate, burst):
        start = time.perf_counter()
        press_enter(page, "talk")
        page.locator("#prompt button.stop-button").wait_for()
        stop_visible = time.perf_counter() - start
        page.wait_for_function(f"() => document.querySelector('#chat').innerText.includes('w{burst - 1} ')")
        burst_shown = time.perf_counter() - start
        if backend.records[-1].pieces_total != 2048:
            raise RuntimeError("the page did not send max_new_tokens=2048: the flood would end before Stop")
        # A user's click lands wherever the button is now, re-rendered or not (no actionability wait).
        where = page.locator("#prompt button.stop-button").bounding_box()
        start = time.perf_counter()
        page.mouse.click(where["x"] + where["width"] / 2, where["y"] + where["height"] / 2)
        page.wait_for_function("() => document.querySelector('#chat').innerText.includes('stopped')", timeout=120_000)
        stopped = time.perf_counter() - start
    backend.gate = None
    return stop_visible, burst_shown, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flood", type=int, default=500, help="tokens the backend emits at once")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="vl2-ui-bench-"))
    image = folder / "photo.jpg"
    Image.new("RGB", (4000, 3000), (120, 130, 140)).save(image, quality=90)
    flood = " ".join(f"w{i}" for i in range(200_000))
    results: dict[str, list[float]] = {}

    def script(conversation) -> str:
        return flood if conversation[-1].text == "talk" else FIND

    backend = ScriptedBackend(script)
    with served(backend, folder) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        for _ in range(args.rounds):
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            results.setdefault("page to interactive", []).append(ready(page, url))
            results.setdefault("attach to image visible (12 MP JPEG)", []).append(attach(page, image))
            page.get_by_label("Find", exact=True).check()
            gate = threading.Semaphore(0)
            backend.gate = gate
            backend.records.clear()
            results.setdefault("send to image on canvas", []).append(send_until_image(page))
            before_close = len(split_into_pieces(FIND[: FIND.index("<|/det|>")]))
            results.setdefault("<|/det|> to box visible", []).append(det_to_box(page, backend, gate, before_close))
            for _ in range(64):
                gate.release()
            backend.gate = None
            page.get_by_label("Ask", exact=True).check()
            page.locator("#sampling-section").get_by_text("Sampling").click()
            page.locator("#max-new-tokens input[type=number]").fill("2048")
            page.locator("#max-new-tokens input[type=number]").press("Enter")
            # The flood must outlast the click on Stop: 2,048 tokens, not the default 512.
            page.wait_for_function("() => document.querySelector('#max-new-tokens input[type=range]').value === '2048'")
            for coalesce in (True, False):
                app.ui.STREAM_INTERVAL_S = 0.1 if coalesce else 0.0
                app.ui.BOX_INTERVAL_S = 0.05 if coalesce else 0.0
                tag = "coalesced (shipped)" if coalesce else "coalescing off"
                shown, burst_shown, stopped = stop_under_flood(page, backend, args.flood, image)
                results.setdefault(f"Stop button shown after Enter, flood, {tag}", []).append(shown)
                results.setdefault(f"Enter to the burst's last token shown, {tag}", []).append(burst_shown)
                results.setdefault(f"Stop pressed to 'stopped' shown, flood, {tag}", []).append(stopped)
            page.close()
        browser.close()
    print(f"\nUI latency, Chromium {CHROMIUM}, {args.rounds} rounds, flood: {args.flood} tokens at once, then 250/s")
    print(f"{'measurement':64} {'median s':>9} {'max s':>8}")
    for name, values in results.items():
        print(f"{name:64} {statistics.median(values):9.3f} {max(values):8.3f}")


if __name__ == "__main__":
    main()
