"""Label characters no font can draw: found per character, named in a header sentence, and drawn
with a font that has them whenever one is installed (the exported PNG shows no empty boxes then)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from app import render
from app.render import (
    BUILTIN_FONT,
    ColorBook,
    LabelFonts,
    draw_boxes,
    fit_label,
    font_warning,
    script_of,
    undrawable_characters,
)

from .app_support import BACKGROUND

NOTO_CJK = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")  # Latin, Arabic, emoji; no CJK


@pytest.fixture
def cjk_font() -> str:
    """Noto Sans CJK: CI installs fonts-noto-cjk (packages.txt, .ci/run), so it is required, not skipped."""
    if NOTO_CJK.is_file():
        return str(NOTO_CJK)
    fc_list = shutil.which("fc-list")
    listed = (
        subprocess.run([fc_list, "--format", "%{file}\n"], capture_output=True, text=True).stdout if fc_list else ""
    )
    for line in listed.splitlines():
        if "NotoSansCJK" in line:
            return line
    pytest.fail("Noto Sans CJK is missing: install fonts-noto-cjk (packages.txt)")


@pytest.fixture
def dejavu() -> str:
    if not DEJAVU.is_file():
        pytest.skip("DejaVu Sans is not installed (fonts-dejavu-core)")
    return str(DEJAVU)


@pytest.fixture
def only_fonts(monkeypatch):
    """Point the renderer's font search at exactly these files ("" is Pillow's built-in Latin font)."""

    def use(*paths: str) -> None:
        monkeypatch.setattr(render, "font_paths", lambda: paths)
        monkeypatch.setattr(render, "system_fonts_with", lambda char: ())

    return use


def drawn(label: str) -> Image.Image:
    return draw_boxes(Image.new("RGB", (400, 300), BACKGROUND), [((50, 80, 350, 280), label)], ColorBook())


def test_latin_and_digits_are_drawable_with_the_installed_fonts_and_the_builtin_one(only_fonts):
    assert undrawable_characters("Cat 42, dog-7 (Éé Üß ñ)") == ""
    assert font_warning(["cat", "dog 2", None, ""]) is None
    only_fonts(BUILTIN_FONT)  # no font file at all: Pillow's own font still draws Latin
    assert undrawable_characters("Cat 42, dog-7") == ""
    assert font_warning(["cat", "dog 2"]) is None


def test_spaces_controls_and_variation_selectors_need_no_glyph(only_fonts):
    only_fonts(BUILTIN_FONT)
    assert undrawable_characters("a b\tc\nd\u00a0e\u200b\u200d\ufe0f") == ""


def test_a_cjk_label_is_drawable_with_noto_cjk(cjk_font, only_fonts):
    assert undrawable_characters("猫 고양이 ねこ ネコ") == ""  # the fonts the app finds by itself
    only_fonts(cjk_font)
    assert undrawable_characters("猫 고양이 ねこ ネコ cat 3") == ""
    assert font_warning(["猫", "고양이"]) is None


@pytest.mark.parametrize("latin_only", ["builtin", "dejavu"])
def test_a_missing_font_is_reported_with_the_characters_and_their_script(latin_only, only_fonts, request):
    only_fonts(BUILTIN_FONT if latin_only == "builtin" else request.getfixturevalue("dejavu"))
    assert undrawable_characters("cat 猫 狗 猫") == "猫狗"
    warning = font_warning(["cat", "猫 狗", None])
    assert warning is not None
    assert "猫 狗 (CJK)" in warning and "cat" not in warning
    assert "fonts-noto-cjk" in warning and "assets/fonts/" in warning


def test_the_warning_names_each_script_and_at_most_a_few_characters(only_fonts):
    only_fonts(BUILTIN_FONT)
    warning = font_warning(["一二三四", "가나", "ก"])
    assert warning is not None
    assert "一 二 三 四 (CJK), 가 (HANGUL) and 2 more" in warning
    assert "나" not in warning and "ก" not in warning
    assert "fonts-noto-cjk" in warning and "fonts-noto-core" in warning  # Thai is among the 2 more


def test_private_use_and_unassigned_characters_are_reported(cjk_font, only_fonts):
    assert undrawable_characters("a\U0010fffdb\u0378") == "\U0010fffd\u0378"  # no installed font maps these
    only_fonts(cjk_font)
    assert undrawable_characters("a\ue000b\u0378c") == "\ue000\u0378"
    warning = font_warning(["logo \ue000", "\u0378"])
    assert warning is not None
    assert "U+E000 (private use), U+0378 (unassigned)" in warning
    assert "apt" not in warning and "assets/fonts/" in warning  # no package has them


def test_scripts_are_named_roughly():
    assert [script_of(c) for c in "猫가ねقकกПé"] == [
        "CJK",
        "HANGUL",
        "HIRAGANA",
        "ARABIC",
        "DEVANAGARI",
        "THAI",
        "CYRILLIC",
        "LATIN",
    ]
    assert [script_of(c) for c in "。🐱→\ue000\u0378"] == ["CJK", "emoji", "symbol", "private use", "unassigned"]


def test_a_label_is_drawn_with_a_font_that_has_it_and_latin_keeps_the_main_font(cjk_font, only_fonts):
    only_fonts(BUILTIN_FONT)
    tofu = drawn("猫")
    only_fonts(cjk_font)
    cjk_only = drawn("猫")
    only_fonts(BUILTIN_FONT, cjk_font)  # a Latin-only main font first, the CJK one after it
    assert ImageChops.difference(drawn("猫"), cjk_only).getbbox() is None
    assert ImageChops.difference(drawn("猫"), tofu).getbbox() is not None
    assert [font.getname() for _, font in LabelFonts(20).runs("cat")] == [render._load(BUILTIN_FONT, 20).getname()]
    assert LabelFonts(20).runs("cat 猫")[0][0] == "cat 猫"  # one font draws it all: one run, in the CJK font


def test_a_label_mixing_scripts_is_drawn_in_runs(cjk_font, dejavu, only_fonts):
    only_fonts(cjk_font, dejavu)
    label = "猫 القط"  # Noto CJK has no Arabic, DejaVu no CJK
    assert undrawable_characters(label) == ""
    runs = LabelFonts(20).runs(label)
    assert [part for part, _ in runs] == ["猫 ", "القط"]
    assert [font.path for _, font in runs] == [cjk_font, dejavu]
    in_runs = drawn(label)
    chip = in_runs.crop((50, 0, 350, 80))
    pixels = set(chip.get_flattened_data())
    assert ColorBook().color(label) in pixels and len(pixels) > 3
    only_fonts(cjk_font)
    assert ImageChops.difference(drawn(label), in_runs).getbbox() is not None  # not the tofu of one font
    only_fonts(cjk_font, dejavu)
    fonts = LabelFonts(20)
    cut = fit_label(label * 30, fonts, 300)
    assert cut.endswith("…") and fonts.getlength(cut) <= 300


@pytest.mark.skipif(shutil.which("fc-list") is None, reason="no fontconfig (macOS, Windows)")
def test_fonts_installed_on_the_system_are_found_through_fontconfig(cjk_font, monkeypatch):
    monkeypatch.setattr(render, "font_paths", lambda: (BUILTIN_FONT,))  # none of the known paths
    assert undrawable_characters("猫") == ""
    assert any("CJK" in path for path in render.system_fonts_with("猫"))
    assert render.system_fonts_with("\U0010fffd") == ()


def test_the_page_header_warns_about_labels_no_font_can_draw(only_fonts):
    from app.backends.scripted import ScriptedBackend
    from app.ui import header_markdown

    backend = ScriptedBackend("")
    assert "⚠️" not in header_markdown(backend, ["cat", "猫"])  # Noto CJK is installed (CI installs it)
    only_fonts(BUILTIN_FONT)  # as on a server without fonts-noto-cjk
    header = header_markdown(backend, ["cat", "猫"])
    assert "⚠️" in header and "猫" in header and "fonts-noto-cjk" in header
