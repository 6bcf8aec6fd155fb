"""The Label tab in a real browser (Debian's Chromium via Playwright, scripted backend)."""

from __future__ import annotations

import zipfile

import pytest
from playwright.sync_api import sync_playwright

from app.backends.scripted import ScriptedBackend, demo_script

from .app_support import running_app, solid_image
from .test_canvas_browser import ARTIFACTS, CHROMIUM, DESKTOP, PHONE


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_label_images_in_the_page_and_download_the_dataset(tmp_path, size):
    photos = [str(solid_image(tmp_path / f"photo{i}.png", (320 + 40 * i, 240))) for i in range(3)]
    phone = size is PHONE
    with running_app(ScriptedBackend(demo_script), tmp_path) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=size, is_mobile=phone, has_touch=phone)
        page.goto(url)
        page.get_by_role("tab", name="Label a dataset").click()
        page.locator("#label-files input[type=file]").set_input_files(photos)
        page.wait_for_function("() => document.querySelectorAll('#label-files .file-preview tr, #label-files "
                               ".file-preview-holder tr').length >= 3 || document.querySelector('#label-files')"
                               ".innerText.includes('photo2.png')")  # fmt: skip
        page.locator("#label-phrases textarea").fill("grey square\nshadow")
        page.get_by_label("YOLO").check()
        page.locator("#label-run").click()
        link = page.locator("#label-download a[download], #label-download a[href*='.zip']").first
        link.wait_for(timeout=60_000)
        assert "Done:" in page.locator("#label-status").inner_text()
        assert page.locator("#label-grid img").count() >= 3
        # Nothing wider than the screen on a phone.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= size["width"] + 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"label-tab-{'phone' if phone else 'desktop'}.png"), full_page=True)
        with page.expect_download() as download:
            link.click()
        saved = tmp_path / "dataset.zip"
        download.value.save_as(saved)
        browser.close()
    with zipfile.ZipFile(saved) as dataset:
        names = dataset.namelist()
    assert sum(name.endswith(".txt") and "/labels/" in name for name in names) == 3
    assert any(name.endswith("/data.yaml") for name in names)
