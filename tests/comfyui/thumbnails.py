"""The template browser's thumbnails (workflows/NAME.jpg): a picture and the workflow's one-line
description from web/templates.json, with a "no download" badge on the demo workflows.

ComfyUI's template browser (frontend 1.32.9 and, so far, later ones) shows a custom node pack's
workflow by its file name only: the description line under a card is the file name with "_" turned
into spaces. So the description is written into the thumbnail, which the browser does show.
"""
from __future__ import annotations

import json
import os
import textwrap

from PIL import Image, ImageDraw, ImageFont

from helpers import REPO

TEMPLATES = os.path.join(REPO, "web", "templates.json")
SIZE = 512
CAPTION = 128  # px of the caption band at the bottom
BACKGROUND = (32, 32, 36)


def templates() -> list[dict]:
    """web/templates.json: [{"name", "description", "no_download"}, ...] in display order."""
    with open(TEMPLATES) as f:
        return json.load(f)


def grid(images: list[Image.Image]) -> Image.Image:
    """Images side by side in a square-ish grid (the outputs of a batch)."""
    cols = int(len(images) ** 0.5 + 0.999)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), BACKGROUND)
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return out


def compose(picture: Image.Image, description: str, no_download: bool) -> Image.Image:
    """A SIZE x SIZE thumbnail: `picture` fitted above a caption band with `description`."""
    out = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    box_w, box_h = SIZE, SIZE - CAPTION
    scale = min(box_w / picture.width, box_h / picture.height)
    if scale >= 2:  # small outputs (32 px digits): whole pixels, not blurred
        scale = int(scale)
        resample = Image.NEAREST
    else:
        resample = Image.LANCZOS
    pic = picture.convert("RGB").resize((max(1, int(picture.width * scale)), max(1, int(picture.height * scale))), resample)
    out.paste(pic, ((box_w - pic.width) // 2, (box_h - pic.height) // 2))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=24)
    y = SIZE - CAPTION + 12
    for line in textwrap.wrap(description, width=38)[:4]:
        draw.text((16, y), line, font=font, fill=(235, 235, 235))
        y += 28
    if no_download:
        badge = ImageFont.load_default(size=26)
        text = "NO DOWNLOAD"
        x0, y0, x1, y1 = draw.textbbox((16, 14), text, font=badge)
        draw.rounded_rectangle((x0 - 10, y0 - 8, x1 + 10, y1 + 8), radius=8, fill=(46, 160, 67))
        draw.text((16, 14), text, font=badge, fill=(255, 255, 255))
    return out
