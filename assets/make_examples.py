"""Rebuild assets/examples from scikit-image's bundled sample images and our own drawings.

Run once (needs `pip install scikit-image`); the outputs are committed, so the app never needs it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parent / "examples"


def skimage_file(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def jpeg(source: Path, name: str, **save) -> None:
    Image.open(source).convert("RGB").save(OUT / name, quality=90, **save)


def exif_rotated_photo() -> None:
    """A 'phone photo': pixels stored sideways with EXIF orientation 6 (display rotates 90° clockwise)."""
    image = Image.open(skimage_file("chelsea.png")).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(OUT / "cat_phone_exif_rotated.jpg", quality=90, exif=exif)


def sales_chart() -> None:
    """A small bar chart with a title, axis labels and values: an OCR / chart-reading example."""
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    sales = [120, 95, 180, 150, 210, 170]
    width, height = 720, 480
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(18)
    title = ImageFont.load_default(26)
    draw.text((width // 2, 30), "Monthly sales 2026 (units)", font=title, fill="black", anchor="mm")
    left, bottom, top = 80, 420, 80
    draw.line((left, top, left, bottom), fill="black", width=2)
    draw.line((left, bottom, width - 40, bottom), fill="black", width=2)
    bar_w = 70
    for i, (month, value) in enumerate(zip(months, sales, strict=True)):
        x = left + 30 + i * 100
        y = bottom - int(value / 220 * (bottom - top))
        draw.rectangle((x, y, x + bar_w, bottom), fill=(0, 130, 200))
        draw.text((x + bar_w // 2, y - 14), str(value), font=font, fill="black", anchor="mm")
        draw.text((x + bar_w // 2, bottom + 18), month, font=font, fill="black", anchor="mm")
    image.save(OUT / "sales_chart.png")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    jpeg(skimage_file("chelsea.png"), "cat.jpg")
    jpeg(skimage_file("astronaut.png"), "astronaut.jpg")
    jpeg(skimage_file("coffee.png"), "coffee.jpg")
    jpeg(skimage_file("rocket.jpg"), "rocket.jpg")
    Image.open(skimage_file("coins.png")).convert("RGB").save(OUT / "coins.png")
    exif_rotated_photo()
    sales_chart()


if __name__ == "__main__":
    main()
