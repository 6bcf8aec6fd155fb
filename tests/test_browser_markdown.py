"""Model and user text cannot make the browser load anything (a real browser, Debian's Chromium).

Markdown images, raw ``<img>`` tags, links and autolinks in a reply, in a grounded label, in the
user's own message and in a rename must all be shown as text: a local listener records every
request, and none may arrive except the control image this test adds itself.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from playwright.sync_api import sync_playwright

from app.backends.scripted import ScriptedBackend

from .app_support import find_reply, running_app, solid_image
from .test_app_browser import send

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@contextmanager
def listener() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on a free local port that records the path of every request it gets."""
    paths: list[str] = []

    class Record(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            paths.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/gif")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Record)
    thread = threading.Thread(target=server.serve_forever, name="leak-listener", daemon=True)
    thread.start()
    try:
        yield server.server_address[1], paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_markdown_in_replies_labels_and_renames_loads_nothing(tmp_path: Path) -> None:
    with listener() as (port, received):
        base = f"http://127.0.0.1:{port}"
        label = f"![x]({base}/label.png)"
        reply = (
            find_reply(label, (100, 100, 500, 500))
            + f' ![leak]({base}/reply.png) <img src="{base}/raw.png"> [link]({base}/link) {base}/auto www.example.com'
        )
        renamed = f"![r]({base}/rename.png)"
        backend = ScriptedBackend(reply)
        image_path = solid_image(tmp_path / "square.png", (900, 600))
        requested: list[str] = []
        with running_app(backend, tmp_path) as url, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url)
            page.get_by_label("Find", exact=True).check()
            send(page, image_path, f"![u]({base}/user.png) the square")
            page.locator("#chat mark").first.wait_for(timeout=30_000)
            # The reply's last words: the stream is done before the box is selected and renamed.
            page.locator("#chat").get_by_text("example.com").wait_for(timeout=30_000)
            # The Markdown itself, not the block around it, which also holds a "processing" overlay.
            counts = page.locator('#box-counts [data-testid="markdown"]')
            # Wait on the count, not the label: were the label rendered as Markdown, its text would
            # be missing and the test should fail on the assertions below that name the leak.
            counts.get_by_text("1 ×").wait_for(timeout=30_000)
            before_rename = counts.inner_html()
            counts_before = counts.inner_text()

            # Select box 1 the way a user does (its number key, focus outside the inputs); the
            # selected box's phrase then gets the stronger tint (alpha 66, not 33).
            page.locator("body").click(position={"x": 5, "y": 5})
            page.keyboard.press("1")
            page.wait_for_function(
                "() => /background:#[0-9a-f]{6}66;/.test(document.querySelector('#chat').innerHTML)", timeout=30_000
            )
            page.get_by_placeholder("New label for the selected box").fill(renamed)
            page.get_by_role("button", name="Rename").click()
            page.wait_for_function(
                "(before) => document.querySelector('#box-counts [data-testid=markdown]').innerHTML !== before",
                arg=before_rename,
                timeout=30_000,
            )

            # No "networkidle" wait: Gradio keeps its event stream open, so that state never comes.
            # Instead a positive control: an image the test itself adds must reach the listener. Once
            # it has, the browser could fetch from there, and any image the page rendered earlier
            # would have been requested before it, so "nothing else arrived" is a real observation.
            page.evaluate(
                "(src) => { const img = new Image(); img.src = src; document.body.append(img); }", f"{base}/control.png"
            )
            page.wait_for_function(
                "(src) => [...document.images].some((img) => img.src === src && img.complete)",
                arg=f"{base}/control.png",
                timeout=30_000,
            )

            surfaces = "#chat, #box-counts, #box-panel, #vl2-canvas"
            canvas_labels = page.eval_on_selector_all(
                "#vl2-canvas [data-box-index]", "(els) => els.map((e) => e.getAttribute('data-label'))"
            )
            captions = page.locator("#vl2-canvas .vl2-cap").all_inner_texts()
            leaked_images = page.eval_on_selector_all(
                f":is({surfaces}) img", f"(els) => els.map((e) => e.src).filter((s) => s.includes(':{port}'))"
            )
            leaked_links = page.eval_on_selector_all(
                f":is({surfaces}) a",
                f"(els) => els.map((e) => e.href).filter((h) => h.includes(':{port}') || h.includes('example.com'))",
            )
            chat_text = page.locator("#chat").inner_text()
            counts_text = counts.inner_text()
            browser.close()
        to_listener = [u for u in requested if f":{port}/" in u]

    assert received == ["/control.png"], f"the listener was asked for {received}"
    assert to_listener == [f"{base}/control.png"], f"the page requested {to_listener}"
    assert leaked_images == [], f"images pointing at the listener: {leaked_images}"
    assert leaked_links == [], f"links made from model/user text: {leaked_links}"
    assert f"![leak](http://127.0.0.1:{port}/reply.png)" in chat_text  # shown as the characters it is
    assert f'<img src="{base}/raw.png">' in chat_text
    assert f"![u]({base}/user.png)" in chat_text
    assert label in chat_text  # the highlighted phrase keeps the model's label as text
    assert counts_before.strip() == f"1 × {label}", counts_before
    assert counts_text.strip() == f"1 × {renamed}", counts_text
    assert canvas_labels == [renamed] and captions == [f"1 {renamed}"]  # drawn as the characters they are
