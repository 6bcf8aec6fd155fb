"""Box drawing: pixels land where the coordinates say, colours per label, any script, plain-text labels."""

from __future__ import annotations

import random
from html import unescape

from PIL import Image, ImageChops, ImageDraw

from app.render import (
    LABEL_CHARACTERS_PER_IMAGE,
    ColorBook,
    _outline,
    draw_boxes,
    fit_label,
    font_path,
    font_size_for,
    for_display,
    line_width_for,
    load_font,
)
from app.session import Session
from app.views import annotated_view, answer_html, raw_output
from model.grounding import parse_grounding

from .app_support import BACKGROUND, find_reply


def test_box_outline_lands_on_the_pixel_coordinates():
    image = Image.new("RGB", (640, 480), BACKGROUND)
    colors = ColorBook()
    (box,) = parse_grounding(find_reply("cat", (100, 200, 300, 400)), 640, 480).boxes
    drawn = draw_boxes(image, [(box.xyxy, "cat")], colors)
    color = colors.color("cat")
    x1, y1, x2, y2 = (round(v) for v in box.xyxy)  # (64, 96, 192, 192)
    assert drawn.getpixel(((x1 + x2) // 2, y2)) == color  # bottom edge
    assert drawn.getpixel((x1, (y1 + y2) // 2)) == color  # left edge
    assert drawn.getpixel((x2, (y1 + y2) // 2)) == color  # right edge
    assert drawn.getpixel(((x1 + x2) // 2, (y1 + y2) // 2)) == BACKGROUND  # inside stays clear
    assert drawn.getpixel((x2 + 20, y2 + 20)) == BACKGROUND
    assert image.getpixel((x1, y1)) == BACKGROUND  # the original is untouched


def test_each_label_gets_its_own_stable_colour():
    colors = ColorBook()
    first, second = colors.color("apple"), colors.color("pear")
    assert first != second and colors.color("apple") == first
    assert colors.hex("apple").startswith("#") and len(colors.hex("apple")) == 7


def test_line_width_scales_with_the_image():
    assert line_width_for(300, 200) == 2
    assert line_width_for(900, 600) == 4
    assert line_width_for(4000, 3000) == 20


def test_labels_in_any_script_render_with_a_cjk_font():
    assert font_path() is not None and "CJK" in font_path(), "install fonts-noto-cjk (packages.txt)"
    image = Image.new("RGB", (400, 300), BACKGROUND)
    colors = ColorBook()
    drawn = draw_boxes(image, [((50, 80, 350, 280), "猫 القط 🐱")], colors)
    chip = drawn.crop((50, 0, 350, 80))
    # the label chip is filled with the box colour and carries glyph pixels in the text colour
    pixels = set(chip.get_flattened_data())
    assert colors.color("猫 القط 🐱") in pixels and len(pixels) > 3


def test_markup_in_labels_is_text_not_html(tmp_path):
    session = Session()
    session.add_image(Image.new("RGB", (100, 100), BACKGROUND), "x.png")
    turn = session.start_turn("q", "q", "Find")
    session.update_reply(
        turn, find_reply("<img src=x onerror=alert(1)>", (1, 2, 3, 4)) + " <script>x</script>", final=True
    )
    html = answer_html(turn, session)
    assert "<img" not in html and "<script>" not in html
    shown = unescape(html)  # what the browser displays: the same characters, as text
    assert "<img src=x onerror=alert(1)>" in shown and "<script>x</script>" in shown
    assert raw_output(session).startswith("<|ref|><img")  # the raw view shows the exact text


def test_annotated_view_draws_on_a_display_copy_of_huge_images():
    session = Session()
    session.add_image(Image.new("RGB", (6000, 4000), BACKGROUND), "big.jpg")
    turn = session.start_turn("q", "q", "Find")
    session.update_reply(turn, find_reply("thing", (0, 0, 499, 499)), final=True)
    assert turn.boxes[0].xyxy[2] > 2900  # original pixels
    view = annotated_view(session, "img1")
    assert max(view.size) == 2048
    assert for_display(session.images["img1"].image).size == view.size
    color = session.colors.color("thing")
    scale = 2048 / 6000
    assert view.getpixel((round(turn.boxes[0].xyxy[2] * scale), 300)) == color


def test_fast_outlines_are_pixel_identical_to_pillows():
    rng = random.Random(5)
    for _ in range(500):
        width, height = rng.randint(10, 300), rng.randint(10, 300)
        x1, x2 = sorted(rng.randint(-20, width + 20) for _ in range(2))
        y1, y2 = sorted(rng.randint(-20, height + 20) for _ in range(2))
        line = rng.randint(1, 30)
        pillow = Image.new("RGB", (width, height), (9, 9, 9))
        ours = pillow.copy()
        ImageDraw.Draw(pillow).rectangle((x1, y1, x2, y2), outline=(255, 0, 0), width=line)
        _outline(ImageDraw.Draw(ours), (x1, y1, x2, y2), (255, 0, 0), line)
        assert ImageChops.difference(pillow, ours).getbbox() is None, ((x1, y1, x2, y2), line)


def test_long_labels_are_cut_to_the_image_and_drawing_text_has_a_budget():
    font = load_font(font_size_for(400, 300))
    cut = fit_label("a very long label " * 20, font, 380)
    assert cut.endswith("…") and font.getlength(cut) <= 380 and "a very long label ".startswith(cut[:18])
    assert fit_label("cat", font, 380) == "cat"
    # More label text than one image may carry: the later boxes keep their outline, not their label.
    image = Image.new("RGB", (400, 300), BACKGROUND)
    filler = [((0, 0, 10, 10), "abcd")] * (LABEL_CHARACTERS_PER_IMAGE // 4)  # the whole budget
    late = ((100, 200, 300, 290), "abcd")
    above_late_box = (101, 200 - font_size_for(400, 300) // 2)  # inside its label chip, when it has one
    alone = draw_boxes(image, [late], ColorBook())
    after_filler = draw_boxes(image, [*filler, late], ColorBook())
    assert alone.getpixel(above_late_box) == ColorBook().color("abcd")
    assert after_filler.getpixel(above_late_box) == BACKGROUND
    assert after_filler.getpixel((200, 290)) == ColorBook().color("abcd")  # its outline is still drawn
