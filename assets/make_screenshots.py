"""Rebuild the README's screenshots: ``python assets/make_screenshots.py`` (needs Chromium).

The app runs on the scripted backend (CI cannot download the real weights), with a hand-written
grounded reply about the astronaut example, so the pictures show the page, not a model's skill.
Writes ``screenshot.png`` (a grounded answer with a hovered box), ``screenshot-landing.png``,
``screenshot-phone.png``, ``screenshot-dark.png`` and ``screenshot-label.png`` (the Label tab after a
run over the examples) next to this file.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from app.backends.scripted import ScriptedBackend  # noqa: E402
from app.ui import build_demo, launch_options  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPLY = (
    "<|ref|>The astronaut<|/ref|><|det|>[[300, 80, 720, 999]]<|/det|> is smiling in her orange flight suit, "
    "holding <|ref|>her helmet<|/ref|><|det|>[[640, 640, 999, 999]]<|/det|>. Behind her are "
    "<|ref|>an American flag<|/ref|><|det|>[[0, 0, 300, 620]]<|/det|> and "
    "<|ref|>a space shuttle model<|/ref|><|det|>[[760, 0, 930, 560]]<|/det|>."
)


# The Label tab's run: boxes (0–999) per example picture (known by its size) and phrase.
LABELLED = {
    (512, 512): {"person": (0, 20, 720, 999), "rocket": (690, 0, 930, 560)},
    (451, 300): {"cat": (0, 0, 950, 999)},
    (600, 400): {"cup": (283, 20, 700, 620)},
    (640, 427): {"rocket": (462, 270, 540, 950)},
}
LABEL_PHRASES = "person, cat, cup, rocket"


def reply(conversation) -> str:
    message = conversation[-1]
    if message.text.startswith("<|ref|>") and message.images:
        phrase = message.text.removeprefix("<|ref|>").split("<|/ref|>")[0]
        box = LABELLED.get(message.images[0].size, {}).get(phrase)
        return f"<|ref|>{phrase}<|/ref|><|det|>[[{', '.join(map(str, box))}]]<|/det|>" if box else ""
    return REPLY if "astronaut" in message.text else "It is a picture."


def label_examples(page: Page) -> None:
    page.get_by_role("tab", name="Label a dataset").click()
    pictures = ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg", "coins.png"]
    page.locator("#label-files input[type=file]").set_input_files([str(HERE / "examples" / p) for p in pictures])
    page.locator("#label-phrases textarea").fill(LABEL_PHRASES)
    page.locator("#label-run").click()
    page.locator("#label-download a").first.wait_for()
    for image in page.locator("#label-grid img").all():
        image.evaluate("el => el.decode()")


def run_example(page: Page, index: int) -> None:
    page.locator("#vl2-canvas .vl2-example").nth(index).click()
    page.locator('#vl2-canvas [data-box-index="4"]').wait_for()
    page.locator("#vl2-canvas .vl2-img").evaluate("el => el.decode()")


def hover_box(page: Page, number: int) -> None:
    shape = page.locator(f'#vl2-canvas [data-box-index="{number}"]').bounding_box()
    page.mouse.move(shape["x"] + 4, shape["y"] + shape["height"] * 0.6)


def main() -> None:
    demo = build_demo(ScriptedBackend(reply), image_dir=Path(tempfile.mkdtemp()))
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True, **launch_options())
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(url)
            page.locator("#vl2-canvas .vl2-example").first.wait_for()
            page.screenshot(path=str(HERE / "screenshot-landing.png"))
            run_example(page, 2)  # "Grounded answer" (the astronaut)
            hover_box(page, 2)
            page.screenshot(path=str(HERE / "screenshot.png"))
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"{url}?__theme=dark")
            run_example(page, 2)
            page.locator('#vl2-canvas [data-box-index="3"]').click()
            page.locator('#box-panel tr.selected[data-box-index="3"]').wait_for()
            page.mouse.move(1, 1)
            page.screenshot(path=str(HERE / "screenshot-dark.png"))
            page = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
            page.goto(url)
            run_example(page, 2)
            page.screenshot(path=str(HERE / "screenshot-phone.png"))
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(url)
            label_examples(page)
            page.screenshot(path=str(HERE / "screenshot-label.png"))
            browser.close()
    finally:
        demo.close()


if __name__ == "__main__":
    main()
