"""The image workspace in a real browser (Debian's Chromium via Playwright, scripted backend).

Desktop 1366×900 and phone 390×844 (touch): the landing, examples, the image appearing at once,
live boxes (hover, click, zoom), the keys, Undo of box edits, one Clear, Stop under a token flood,
and text contrast in light and dark themes. Screenshots go to CI_ARTIFACTS.
"""

from __future__ import annotations

import base64
import os
import shutil
import threading
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from app.backends.scripted import ScriptedBackend, split_into_pieces

from .app_support import find_reply, running_app, solid_image

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("CI_ARTIFACTS", ROOT / "ci-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DESKTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
BIG = (250, 250, 750, 750)
SMALL = (100, 100, 200, 200)
FLOOD = " ".join(f"w{i}" for i in range(4000))


GROUNDED = f"The {find_reply('grey square', BIG)} holds a {find_reply('small square', SMALL)}."
# Six boxes sharing their top edge: six captions that would all sit on the same line.
CROWD = " ".join(find_reply(f"item {i}", (100 + 40 * i, 300, 400 + 40 * i, 700)) for i in range(6))


def _script(conversation) -> str:
    prompt = conversation[-1].text
    if prompt == "talk":
        return FLOOD
    if "crowd" in prompt:
        return CROWD
    if prompt.startswith("What is the object"):
        return "A grey square."
    if "<|ref|>" in prompt or prompt.startswith("<|grounding|>"):
        return GROUNDED
    return "It is a grey picture."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    backend = ScriptedBackend(_script)
    folder = tmp_path_factory.mktemp("canvas")
    image = solid_image(folder / "square.png", (900, 600))
    with running_app(backend, folder) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield backend, url, browser, image
        browser.close()


def _open(served, size: dict, *, theme: str = "light") -> Page:
    backend, url, browser, _image = served
    backend.gate = None
    phone = size is PHONE
    page = browser.new_page(viewport=size, is_mobile=phone, has_touch=phone)
    page.goto(f"{url}?__theme={theme}")
    page.wait_for_function(
        "() => window.vl2Canvas && document.querySelector('#vl2-canvas .vl2-example')"
        " && document.querySelector('#prompt input[type=file]')"
    )
    return page


def _in_viewport(page: Page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    view = page.viewport_size
    return box is not None and box["y"] >= 0 and box["x"] >= 0 and box["y"] + box["height"] <= view["height"]


def _send(page: Page, image: Path | None, text: str, mode: str = "Find") -> None:
    page.get_by_label(mode, exact=True).check()
    if image is not None:
        page.locator("#prompt input[type=file]").set_input_files(str(image))
    prompt = page.locator("#prompt textarea")
    prompt.fill(text)
    page.wait_for_function("() => !document.querySelector('#prompt button.submit-button')?.disabled")
    prompt.press("Enter")


def _paced(backend: ScriptedBackend) -> tuple[threading.Semaphore, threading.Event]:
    """Each token of the next reply waits for a release of the semaphore; the event is set when
    the reply starts."""
    gate, started = threading.Semaphore(0), threading.Event()

    def paced(conversation):  # the backend calls this as the reply starts
        started.set()
        return gate

    backend.gate = paced
    backend.records.clear()
    return gate, started


def _box(page: Page, number: int):
    return page.locator(f'#vl2-canvas [data-box-index="{number}"]')


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_landing_shows_the_drop_zone_and_examples_and_an_example_stays_in_view(served, size):
    page = _open(served, size)
    assert page.get_by_text("Drop an image or pick an example").is_visible()
    assert _in_viewport(page, "#vl2-canvas .vl2-example"), "the examples must be above the fold"
    name = "desktop" if size is DESKTOP else "phone"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"canvas-landing-{name}.png"))
    page.locator("#vl2-canvas .vl2-example").first.click()  # "Find the cat": runs at once
    _box(page, 1).wait_for()
    assert _in_viewport(page, '#vl2-canvas [data-box-index="1"]'), "the result must stay in view"
    assert page.get_by_label("Find", exact=True).is_checked()  # the example's mode is shown
    page.close()


def test_the_image_is_on_the_canvas_before_the_answer_and_boxes_arrive_with_their_tags(served):
    backend, _url, _browser, image = served
    page = _open(served, DESKTOP)
    page.locator("#prompt input[type=file]").set_input_files(str(image))
    # Attached, not sent: the canvas shows it already, and says it is not sent yet.
    page.wait_for_function("() => document.querySelector('#vl2-canvas .vl2-img').naturalWidth > 0")
    assert page.locator("#vl2-canvas .vl2-pending").is_visible()
    gate, started = _paced(backend)
    _send(page, None, "the squares")
    page.wait_for_function(
        "() => { const i = document.querySelector('#vl2-canvas .vl2-img');"
        " return i.src.includes('vl2-views') && i.complete && i.naturalWidth > 0; }"
    )
    assert not page.locator("#vl2-canvas .vl2-pending").is_visible()
    assert page.locator("#prompt button.stop-button").is_visible(), "Stop shows while the answer is generated"
    assert started.wait(timeout=30)
    assert _box(page, 1).count() == 0 and not backend.records[-1].finished.is_set()  # nothing answered yet
    first_box = GROUNDED[: GROUNDED.index("<|/det|>") + len("<|/det|>")]
    for _ in range(len(split_into_pieces(first_box))):
        gate.release()
    _box(page, 1).wait_for()  # the first box, while the answer is still being written
    assert not backend.records[-1].finished.is_set()
    assert _box(page, 2).count() == 0
    for _ in range(100):
        gate.release()
    _box(page, 2).wait_for()
    page.locator("#prompt button.submit-button").wait_for()  # Send is back, Stop gone
    assert not page.locator("#prompt button.stop-button").is_visible()
    page.close()


def test_hover_click_and_zoom_on_the_live_boxes(served):
    _backend, _url, _browser, image = served
    page = _open(served, DESKTOP)
    _send(page, image, "the squares")
    big = _box(page, 1)
    big.wait_for()
    assert big.get_attribute("data-label") == "grey square"
    shape = big.bounding_box()
    # Hover: a tooltip with the label and pixel box, and the phrase in the answer lit up.
    page.mouse.move(shape["x"] + 3, shape["y"] + shape["height"] / 2)
    tip = page.locator("#vl2-canvas .vl2-tip")
    assert tip.is_visible() and "grey square" in tip.inner_text() and "px" in tip.inner_text()
    assert "vl2-hover" in page.locator("#chat mark.vl2-box-1").get_attribute("class")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "canvas-hover.png"))
    # Click: the same box is selected in the panel and in the answer.
    page.mouse.click(shape["x"] + 3, shape["y"] + shape["height"] / 2)
    page.locator('#box-panel tr.selected[data-box-index="1"]').wait_for()
    page.wait_for_function("() => document.querySelector('#chat mark.vl2-box-1').style.outlineStyle === 'solid'")
    # Clicking a phrase selects its box too.
    page.locator("#chat mark.vl2-box-2").click()
    page.locator('#box-panel tr.selected[data-box-index="2"]').wait_for()
    # Zoom: the box grows on screen, the wheel zooms about the pointer, double-click fits again.
    page.locator('#vl2-canvas [data-act="zoom-in"]').click()
    zoomed = big.bounding_box()
    assert zoomed["width"] == pytest.approx(shape["width"] * 1.25, rel=0.02)
    page.mouse.move(shape["x"] + shape["width"] / 2, shape["y"] + shape["height"] / 2)
    page.mouse.wheel(0, -400)
    page.wait_for_function(
        f"() => document.querySelector('#vl2-canvas [data-box-index=\"1\"]')"
        f".getBoundingClientRect().width > {zoomed['width'] * 1.2}"
    )
    page.locator("#vl2-canvas .vl2-stage").dblclick(position={"x": 5, "y": 5})
    page.wait_for_function(
        f"() => Math.abs(document.querySelector('#vl2-canvas [data-box-index=\"1\"]')"
        f".getBoundingClientRect().width - {shape['width']}) < {shape['width'] * 0.01}"
    )
    # Captions toggle apart from boxes.
    assert page.locator("#vl2-canvas .vl2-cap").count() == 2
    page.locator('#vl2-canvas [data-act="captions"]').uncheck()
    assert page.locator("#vl2-canvas .vl2-cap").count() == 0 and big.is_visible()
    page.close()


def test_captions_never_overlap_each_other(served):
    _backend, _url, _browser, image = served
    page = _open(served, DESKTOP)
    _send(page, image, "the crowd")
    _box(page, 6).wait_for()
    rects = [c.bounding_box() for c in page.locator("#vl2-canvas .vl2-cap").all()]
    assert len(rects) == 6
    for i, a in enumerate(rects):
        for b in rects[i + 1 :]:
            apart = a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
            apart = apart or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"]
            assert apart, f"captions overlap: {a} {b}"
    page.close()


def test_keys_select_boxes_and_never_type_into_a_field(served):
    _backend, _url, _browser, image = served
    page = _open(served, DESKTOP)
    _send(page, image, "the squares")
    _box(page, 2).wait_for()
    page.keyboard.press("2")  # focus went to the workspace after sending
    page.locator('#box-panel tr.selected[data-box-index="2"]').wait_for()
    assert page.locator("#prompt textarea").input_value() == ""
    page.keyboard.type("hi")  # letters typed on the workspace go to the prompt
    assert page.locator("#prompt textarea").input_value() == "hi"
    page.keyboard.press("1")  # in the prompt now: a digit is text, not a shortcut
    assert page.locator("#prompt textarea").input_value() == "hi1"
    assert page.locator('#box-panel tr.selected[data-box-index="2"]').count() == 1
    page.close()


def test_undo_restores_deleted_and_renamed_boxes_and_one_clear_clears_all(served):
    _backend, _url, _browser, image = served
    page = _open(served, DESKTOP)
    _send(page, image, "the squares")
    _box(page, 2).wait_for()
    _box(page, 2).click()
    page.locator('#box-panel tr.selected[data-box-index="2"]').wait_for()
    page.get_by_role("button", name="Delete").click()
    page.wait_for_function("() => !document.querySelector('#vl2-canvas [data-box-index=\"2\"]')")
    page.get_by_role("button", name="Undo").click()
    _box(page, 2).wait_for()
    _box(page, 1).click()
    page.locator('#box-panel tr.selected[data-box-index="1"]').wait_for()
    page.get_by_placeholder("New label for the selected box").fill("blue door")
    page.get_by_role("button", name="Rename").click()
    page.locator('#vl2-canvas [data-label="blue door"]').wait_for()
    page.get_by_role("button", name="Undo").click()
    page.locator('#vl2-canvas [data-box-index="1"][data-label="grey square"]').wait_for()
    assert page.locator("#chat").get_by_text("grey square").count() == 1  # the turn itself is still there
    # The chat's own trash icon is not offered: the page has one Clear.
    assert page.locator("#chat button[aria-label='Clear']").filter(visible=True).count() == 0
    page.locator("#prompt input[type=file]").set_input_files(str(image))  # attached, not sent
    page.get_by_role("button", name="Clear all").click()
    page.get_by_text("Drop an image or pick an example").wait_for()
    assert page.locator("#box-panel tr[data-box-index]").count() == 0
    assert page.locator("#chat .message").count() == 0
    page.wait_for_function("() => !document.querySelector('#prompt .thumbnail-item, #prompt .thumbnail-image')")
    page.close()


def test_dropping_an_image_on_the_canvas_attaches_it(served):
    _backend, _url, _browser, image = served
    page = _open(served, DESKTOP)
    data = base64.b64encode(image.read_bytes()).decode()
    page.evaluate(
        """(data) => {
          const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
          const target = document.querySelector('#vl2-canvas .vl2-stage');
          for (const type of ['dragover', 'drop']) {
            target.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
          }
        }""",
        data,
    )
    page.wait_for_function("() => document.querySelector('#vl2-canvas .vl2-img').naturalWidth === 900")
    assert page.locator("#vl2-canvas .vl2-pending").is_visible()
    _send(page, None, "the squares")  # the prompt sends the dropped image
    _box(page, 1).wait_for()
    assert page.locator("#vl2-canvas .vl2-name").inner_text() == "dropped.png"
    page.close()


def test_phone_has_canvas_and_prompt_on_the_first_screen(served):
    _backend, _url, _browser, image = served
    page = _open(served, PHONE)
    for selector in ("#vl2-canvas .vl2-stage", "#prompt textarea"):
        assert _in_viewport(page, selector), f"{selector} must be on the first screen"
    assert not page.locator("#keyboard-help").is_visible(), "no keyboard hints on a touch screen"
    assert page.locator("#box-panel").is_hidden(), "the box panel starts folded on a phone"
    _send(page, image, "the squares")
    _box(page, 1).wait_for()
    for selector in ("#vl2-canvas .vl2-stage", "#prompt textarea"):
        assert _in_viewport(page, selector)
    for button in page.locator("#vl2-canvas .vl2-bar .vl2-btn").filter(visible=True).all():
        assert button.bounding_box()["height"] >= 36, "touch-sized controls"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "canvas-phone.png"))
    page.close()


def test_stop_under_a_token_flood(served):
    backend, _url, _browser, _image = served
    page = _open(served, DESKTOP)
    gate, started = _paced(backend)
    for _ in range(500):  # the backend emits 500 tokens at once…
        gate.release()
    _send(page, None, "talk", mode="Ask")
    stop = page.locator("#prompt button.stop-button")
    stop.wait_for(timeout=5_000)
    assert started.wait(timeout=30) and backend.records[-1].pieces_total == 512  # the page's default cap
    page.wait_for_function("() => document.querySelector('#chat').innerText.includes('w499')", timeout=10_000)
    # …then keeps going (a token every 0.1 s, so the 12 left last longer than a click takes) while
    # the user presses Stop: the page must not have fallen behind the flood.
    flooding = threading.Event()

    def flood() -> None:
        while not flooding.wait(0.1):
            gate.release()

    pump = threading.Thread(target=flood, daemon=True)
    pump.start()
    try:
        where = stop.bounding_box()
        page.mouse.click(where["x"] + where["width"] / 2, where["y"] + where["height"] / 2)
        # A loose bound that still catches a page tens of seconds behind (bench.ui_latency times it).
        page.wait_for_function("() => document.querySelector('#chat').innerText.includes('stopped')", timeout=5_000)
    finally:
        flooding.set()
        pump.join()
    record = backend.records[-1]
    assert record.cancel_event.is_set() and record.pieces_sent < record.pieces_total
    page.close()


CONTRAST = """
() => {
  // WCAG 2 contrast of each visible text run against the colour painted behind it.
  const parse = (c) => { const m = /rgba?\\(([^)]+)\\)/.exec(c); if (!m) return null;
    const p = m[1].split(/[ ,/]+/).filter(Boolean).map(Number); return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; };
  const lum = (c) => { const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    return 0.2126 * f(c[0]) + 0.7152 * f(c[1]) + 0.0722 * f(c[2]); };
  const over = (top, under) => [0, 1, 2].map((i) => top[i] * top[3] + under[i] * (1 - top[3])).concat(1);
  const behind = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const s = getComputedStyle(e);
      if (s.backgroundImage !== 'none' && e.tagName !== 'BUTTON') return null;  // a picture: not judged
      const c = parse(s.backgroundColor);
      if (c && c[3] > 0) { layers.push(c); if (c[3] >= 1) break; }
    }
    let colour = parse(getComputedStyle(document.body).backgroundColor) || [255, 255, 255, 1];
    if (colour[3] < 1) colour = [255, 255, 255, 1];
    for (const c of layers.reverse()) colour = over(c, colour);
    return colour;
  };
  const failures = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!n.textContent.trim() || !el || el.closest('svg, .vl2-world')) continue;
    const r = el.getBoundingClientRect();
    if (!r.width || !r.height || !el.checkVisibility({opacityProperty: true, visibilityProperty: true})) continue;
    const s = getComputedStyle(el);
    const fg = parse(s.color), bg = behind(el);
    if (!fg || !bg) continue;
    let opacity = 1; for (let e = el; e; e = e.parentElement) opacity *= Number(getComputedStyle(e).opacity);
    const text = over([fg[0], fg[1], fg[2], fg[3] * opacity], bg);
    const a = lum(text), b = lum(bg), ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(s.fontSize), large = size >= 24 || (Number(s.fontWeight) >= 700 && size >= 18.66);
    if (ratio < (large ? 3 : 4.5)) failures.push(`${ratio.toFixed(2)}: ${n.textContent.trim().slice(0, 40)}`);
  }
  return failures;
}
"""


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_text_contrast_meets_wcag_aa(served, theme):
    _backend, _url, _browser, image = served
    page = _open(served, DESKTOP, theme=theme)
    assert page.evaluate(CONTRAST) == []
    _send(page, image, "the squares", mode="Grounded answer")
    _box(page, 2).wait_for()
    _box(page, 1).click()
    page.locator('#box-panel tr.selected[data-box-index="1"]').wait_for()
    assert page.evaluate(CONTRAST) == []
    if theme == "dark":
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "canvas-dark.png"))
    page.close()
