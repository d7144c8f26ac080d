"""Draw the Teams app icons: color.png (192x192) and outline.png (32x32).

Run with: .venv/bin/python manifest/make_icons.py
The glyph is a chat bubble with a small clock in its corner: a conversation
that keeps going while a long task runs.
"""

from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ACCENT = (79, 107, 237, 255)  # #4F6BED, the manifest's accentColor
WHITE = (255, 255, 255, 255)
CLEAR = (0, 0, 0, 0)
SCALE = 4  # draw large, then downsample for smooth edges


def draw_glyph(draw: ImageDraw.ImageDraw, size: int, ink: tuple, hole: tuple, stroke: int) -> None:
    """Chat bubble plus clock, on a square canvas of `size` pixels."""
    s = size / 32  # the glyph is designed on a 32-unit grid
    # Bubble body and tail.
    draw.rounded_rectangle([2 * s, 4 * s, 26 * s, 21 * s], radius=5 * s, fill=ink)
    draw.polygon([(7 * s, 20 * s), (7 * s, 27 * s), (14 * s, 20 * s)], fill=ink)
    # Three "typing" dots inside the bubble.
    for x in (8, 14, 20):
        draw.ellipse([(x - 1.6) * s, 10.9 * s, (x + 1.6) * s, 14.1 * s], fill=hole)
    # Clock badge at the bottom right, ringed so it reads apart from the bubble.
    cx, cy, r = 23.5 * s, 23.5 * s, 7.5 * s
    draw.ellipse([cx - r - stroke, cy - r - stroke, cx + r + stroke, cy + r + stroke], fill=hole)
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    hand = max(1.0, 1.4 * s)
    draw.line([(cx, cy), (cx, cy - 4.8 * s)], fill=hole, width=round(hand))
    draw.line([(cx, cy), (cx + 3.6 * s, cy)], fill=hole, width=round(hand))


def make_color(path: Path) -> None:
    """192x192, opaque: accent rounded square filling the frame, white glyph."""
    big = 192 * SCALE
    img = Image.new("RGBA", (big, big), ACCENT)
    glyph = Image.new("RGBA", (big, big), CLEAR)
    pad = big * 0.18
    inner = int(big - 2 * pad)
    g = Image.new("RGBA", (inner, inner), CLEAR)
    draw_glyph(ImageDraw.Draw(g), inner, WHITE, ACCENT, stroke=int(1.2 * inner / 32))
    glyph.paste(g, (int(pad), int(pad)), g)
    img.alpha_composite(glyph)
    img.convert("RGB").resize((192, 192), Image.Resampling.LANCZOS).save(path)


def make_outline(path: Path) -> None:
    """32x32, white on transparent: every pixel is (255, 255, 255, alpha)."""
    big = 32 * SCALE
    mask = Image.new("L", (big, big), 0)
    draw_glyph(ImageDraw.Draw(mask), big, (255,), (0,), stroke=int(1.2 * SCALE))
    alpha = mask.resize((32, 32), Image.Resampling.LANCZOS)
    white = Image.new("L", (32, 32), 255)
    Image.merge("RGBA", (white, white, white, alpha)).save(path)


if __name__ == "__main__":
    make_color(HERE / "color.png")
    make_outline(HERE / "outline.png")
    print(f"wrote {HERE / 'color.png'} and {HERE / 'outline.png'}")
