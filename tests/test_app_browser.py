"""A real browser (Debian's Chromium via Playwright): upload, Find, and check the box on screen.

The screenshot is kept as a CI artifact (its path is printed).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.parse
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

from app.backends.scripted import ScriptedBackend
from app.render import ColorBook

from .app_support import find_reply, running_app, solid_image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CI_ARTIFACTS", ROOT / "ci-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BOX = (250, 250, 750, 750)


def _close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 60) -> bool:
    return sum(abs(x - y) for x, y in zip(a[:3], b[:3], strict=True)) <= tolerance


def send(page, image_path, text: str):
    """Attach an image and send a message the way a user does (Enter in the prompt box)."""
    page.locator("#prompt input[type=file]").set_input_files(str(image_path))
    textbox = page.locator("#prompt textarea")
    textbox.fill(text)
    page.wait_for_function("() => !document.querySelector('button.submit-button')?.disabled")
    textbox.press("Enter")
    return textbox


def on_screen_transform(image, original_width: int) -> tuple[float, float, float]:
    """(left, top, scale) of the canvas image on screen: it is laid out at its original pixel size
    and scaled, so original pixel (x, y) is at (left + x * scale, top + y * scale)."""
    box = image.bounding_box()
    return box["x"], box["y"], box["width"] / original_width


def open_and_find(playwright, url: str, image_path, text: str):
    """A desktop-sized page on the app, with ``text`` sent in Find mode about ``image_path``."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.get_by_label("Find", exact=True).check()
    send(page, image_path, text)
    return browser, page


def test_find_draws_the_box_in_the_browser(tmp_path):
    backend = ScriptedBackend(find_reply("grey square", BOX))
    image_path = solid_image(tmp_path / "square.png", (900, 600))
    expected = ColorBook().color("grey square")  # first label of a session gets the first colour
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot_path = ARTIFACTS / "browser-find.png"
    with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
        browser, page = open_and_find(playwright, url, image_path, "the grey square")
        page.locator("mark", has_text="grey square").wait_for(timeout=30_000)
        page.locator('#vl2-canvas [data-box-index="1"]').wait_for(timeout=30_000)
        shown = page.locator("#vl2-canvas .vl2-img")
        shown.evaluate("el => el.decode()")
        page.mouse.move(1, 1)  # no hover highlight in the picture
        page.screenshot(path=str(shot_path))
        left, top, scale = on_screen_transform(shown, 900)
        browser.close()
    print(f"\nbrowser screenshot: {shot_path}")
    screenshot = Image.open(shot_path).convert("RGB")
    x1, y1, x2, y2 = (v / 999 * s for v, s in zip(BOX, (900, 600, 900, 600), strict=True))

    def on_screen(x: float, y: float) -> tuple[int, int]:
        return round(left + x * scale), round(top + y * scale)

    def any_pixel_near(x: float, y: float, radius: int = 3) -> bool:
        cx, cy = on_screen(x, y)
        return any(
            _close(screenshot.getpixel((cx + dx, cy + dy)), expected)
            for dx in range(-radius, radius + 1)
            for dy in range(-radius, radius + 1)
        )

    assert any_pixel_near((x1 + x2) / 2, y2), "bottom edge not drawn where the box is"
    assert any_pixel_near(x1, (y1 + y2) / 2), "left edge not drawn where the box is"
    assert any_pixel_near(x2, (y1 + y2) / 2), "right edge not drawn where the box is"
    inside = screenshot.getpixel(on_screen((x1 + x2) / 2, (y1 + y2) / 2))
    assert _close(inside, (128, 128, 128)), "the inside of the box must stay clear"


def _click_script(conversation):
    prompt = conversation[-1].text
    if prompt.startswith("What is the object"):
        return "A grey square."
    if "<|ref|>" in prompt:
        return find_reply("grey square", BOX)
    return "It is a grey picture."


def test_click_to_ground_in_the_browser(tmp_path):
    import json

    backend = ScriptedBackend(_click_script)
    image_path = solid_image(tmp_path / "square.png", (900, 600))
    expected = ColorBook().color("grey square")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot_path = ARTIFACTS / "browser-click.png"
    with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        send(page, image_path, "What is this?")
        page.get_by_text("It is a grey picture.").wait_for(timeout=30_000)
        shown = page.locator("#vl2-canvas .vl2-img")
        page.wait_for_function(
            "(el) => el.src.includes('vl2-views') && el.complete && el.naturalWidth > 0", arg=shown.element_handle()
        )
        left, top, scale = on_screen_transform(shown, 900)
        click_x, click_y = 400, 330  # inside BOX on the 900×600 image
        page.mouse.click(left + click_x * scale, top + click_y * scale)
        page.locator("#box-counts").get_by_text("1 × grey square").wait_for(timeout=30_000)
        assert page.locator("#box-panel").get_by_text("grey square").count() >= 1  # the panel gained a row
        page.locator('#vl2-canvas [data-box-index="1"]').wait_for()
        page.mouse.move(1, 1)  # no hover highlight in the picture
        page.screenshot(path=str(shot_path))
        with page.expect_download(timeout=30_000) as download:  # one click downloads the export
            page.get_by_role("button", name="JSON").click()
        document = json.loads(Path(download.value.path()).read_text())
        browser.close()
    print(f"\nbrowser screenshot: {shot_path}")
    (click_turn,) = [t for t in document["turns"] if t["kind"] == "click"]
    (exported,) = click_turn["boxes"]
    assert exported["label"] == "grey square" and exported["norm999"] == list(BOX)
    x1, y1, x2, y2 = exported["xyxy"]
    assert x1 <= click_x <= x2 and y1 <= click_y <= y2
    screenshot = Image.open(shot_path).convert("RGB")

    def near(x: float, y: float, color, radius: int = 3) -> bool:
        cx, cy = round(left + x * scale), round(top + y * scale)
        return any(
            _close(screenshot.getpixel((cx + dx, cy + dy)), color)
            for dx in range(-radius, radius + 1)
            for dy in range(-radius, radius + 1)
        )

    assert near((x1 + x2) / 2, y2, expected), "the box must be drawn around the clicked point"
    assert near(x1, (y1 + y2) / 2, expected)
    assert near(click_x, click_y, (215, 38, 61)), "the pin must be drawn where the user clicked"


def test_keyboard_selects_boxes_and_escape_stops(tmp_path):
    import re
    import threading

    gate = threading.Semaphore(0)
    grounded = find_reply("a", (100, 100, 300, 300)) + " " + find_reply("b", (500, 500, 900, 900))
    long_reply = " ".join(f"word{i}" for i in range(300))
    backend = ScriptedBackend(lambda conv: grounded if conv[-1].text.startswith("<|grounding|>") else long_reply)
    image_path = solid_image(tmp_path / "square.png", (900, 600))
    with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        textbox = send(page, image_path, "<|grounding|>two things")
        page.locator("#box-counts").get_by_text("1 × b").wait_for(timeout=30_000)
        page.keyboard.press("2")  # after sending, the keys reach the workspace, not the prompt
        page.wait_for_function(
            "() => /background:#[0-9a-f]{6}66;/.test(document.querySelector('#chat').innerHTML)", timeout=30_000
        )
        marks = re.findall(
            r'<mark class="vl2-ref vl2-box-\d+" style="background:(#[0-9a-f]+);', page.locator("#chat").inner_html()
        )
        second = ColorBook()
        second.color("a")
        assert marks == [second.hex("a") + "33", second.hex("b") + "66"]  # box 2's phrase is the selected one
        # Esc stops a running reply, and the backend's generation with it.
        backend.gate = gate
        textbox.fill("Talk for a while.")
        textbox.press("Enter")
        for _ in range(3):
            gate.release()
        page.get_by_text("word0 word1 word2").wait_for(timeout=30_000)
        page.locator("body").click(position={"x": 5, "y": 5})
        record = backend.records[-1]
        page.keyboard.press("Escape")
        assert record.cancel_event.wait(timeout=30), "Esc did not reach the server"
        gate.release()  # the paced generation takes its next step and sees the cancel
        assert record.finished.wait(timeout=30)
        page.wait_for_function("() => document.querySelector('#chat').innerText.includes('stopped')", timeout=30_000)
        browser.close()
    assert record.cancelled_at == 3 and record.pieces_sent == 3 < record.pieces_total


def test_closing_the_tab_cancels_the_generation(tmp_path):
    import threading

    gate = threading.Semaphore(0)
    backend = ScriptedBackend(" ".join(f"w{i}" for i in range(300)), gate=gate)
    with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(url)
        textbox = page.locator("#prompt textarea")
        textbox.fill("talk")
        page.wait_for_function("() => !document.querySelector('button.submit-button')?.disabled")
        textbox.press("Enter")
        for _ in range(3):
            gate.release()
        page.get_by_text("w0 w1 w2").wait_for(timeout=30_000)
        record = backend.records[-1]
        page.close()
        assert record.cancel_event.wait(timeout=60), "closing the tab must cancel the generation"
        gate.release()  # its next step sees the cancel
        assert record.finished.wait(timeout=30)
        browser.close()
    assert record.cancelled_at == 3 and record.pieces_sent == 3


def test_closing_the_tab_deletes_the_sessions_files(tmp_path):
    backend = ScriptedBackend(find_reply("grey square", BOX))
    image_path = solid_image(tmp_path / "square.png", (900, 600))
    with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
        browser, page = open_and_find(playwright, url, image_path, "the grey square")
        page.locator("#box-counts").get_by_text("1 × grey square").wait_for(timeout=30_000)
        page.get_by_role("button", name="JSON").click()  # an export, written into the session's folder
        page.locator("#download a").first.wait_for(timeout=30_000)
        sessions = next((tmp_path / "images").glob("vl2-studio-*")) / "sessions"
        source = page.locator("#vl2-canvas .vl2-img").get_attribute("src")
        shown = Path(urllib.parse.unquote(source.split("gradio_api/file=", 1)[1]))
        assert shown.is_file() and "vl2-views" in shown.parts, shown  # the canvas's copy of the image
        assert any(p.is_file() for p in sessions.rglob("*"))
        page.close()  # Gradio sees the page's heartbeat end and runs the app's unload handler
        # Waiting on the server's clean-up, which nothing signals to the test: poll with a deadline.
        deadline = time.monotonic() + 60
        while left := [p for p in [*sessions.rglob("*"), shown] if p.is_file()]:
            assert time.monotonic() < deadline, f"still there a minute after the tab closed: {left}"
            threading.Event().wait(0.25)
        print(f"\nsession files gone {60 - (deadline - time.monotonic()):.1f} s after the tab closed")
        browser.close()
