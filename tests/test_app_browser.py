"""A real browser (Debian's Chromium via Playwright): upload, Find, and check the box on screen.

The screenshot is kept as a CI artifact (its path is printed).
"""

from __future__ import annotations

import os
import shutil
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


def test_find_draws_the_box_in_the_browser(tmp_path):
    backend = ScriptedBackend(find_reply("grey square", BOX))
    image_path = solid_image(tmp_path / "square.png", (900, 600))
    expected = ColorBook().color("grey square")  # first label of a session gets the first colour
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot_path = ARTIFACTS / "browser-find.png"
    with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.get_by_label("Find", exact=True).check()
        page.locator("#prompt input[type=file]").set_input_files(str(image_path))
        textbox = page.locator("#prompt textarea")
        textbox.fill("the grey square")
        page.locator("button.submit-button").first.wait_for(state="visible")
        page.wait_for_function("() => !document.querySelector('button.submit-button')?.disabled")
        textbox.press("Enter")
        page.locator("mark", has_text="grey square").wait_for(timeout=30_000)
        shown = page.locator("#image-view img").first
        shown.wait_for(state="visible")
        page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=shown.element_handle(), timeout=30_000)
        page.screenshot(path=str(shot_path), full_page=True)
        box = shown.bounding_box()
        natural = shown.evaluate("el => [el.naturalWidth, el.naturalHeight]")
        browser.close()
    print(f"\nbrowser screenshot: {shot_path}")
    screenshot = Image.open(shot_path).convert("RGB")
    # The <img> is laid out with object-fit: contain, so the picture is centred inside its box.
    scale = min(box["width"] / natural[0], box["height"] / natural[1])
    left = box["x"] + (box["width"] - natural[0] * scale) / 2
    top = box["y"] + (box["height"] - natural[1] * scale) / 2
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
