"""Contact sheets: a grid of sample images with their boxes, class names and titles (PIL only).

Used by the prepare stage to show what the pipeline trains on (plots/prepare/*.png), and handy to
eyeball augmentations and pseudo-labels. Small images are enlarged with nearest-neighbour sampling so
pixels stay visible; boxes are scaled with them and drawn in a per-class colour with a label tag.
"""

from __future__ import annotations

import colorsys
import os
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def class_colour(name: str, index: int | None = None) -> tuple[int, int, int]:
    """A bright, stable colour per class (golden-ratio hue steps by index, or by a hash of the name)."""
    k = index if index is not None else sum((i + 1) * ord(ch) for i, ch in enumerate(name))
    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def contact_sheet(
    images: list[Image.Image],
    boxes: list[list] | None = None,
    labels: list[list[str]] | None = None,
    titles: list[str] | None = None,
    cols: int = 8,
    tile: int = 160,
    pad: int = 6,
    class_names: list[str] | None = None,
    background=(24, 24, 28),
) -> Image.Image:
    """Lay ``images`` out on a ``cols``-wide grid of ``tile`` px cells and return the sheet (RGB).

    boxes[i] are [x0, y0, x1, y1] in the pixel coordinates of images[i]; labels[i] their class names
    (same length); titles[i] is written under cell i. ``class_names`` fixes the colour of each class.
    """
    if not images:
        raise ValueError("contact_sheet needs at least one image")
    n = len(images)
    for what, seq in (("boxes", boxes), ("labels", labels), ("titles", titles)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"contact_sheet: {len(seq)} {what} for {n} images")
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    title_h = 16 if titles is not None else 0
    font, small = _font(12), _font(10)
    palette = {c: class_colour(c, i) for i, c in enumerate(class_names or [])}
    sheet = Image.new("RGB", (cols * (tile + pad) + pad, rows * (tile + pad + title_h) + pad), background)
    draw = ImageDraw.Draw(sheet)
    for i, img in enumerate(images):
        img = img.convert("RGB")
        scale = tile / max(img.width, img.height)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.LANCZOS
        r, c = divmod(i, cols)
        x0 = pad + c * (tile + pad) + (tile - w) // 2
        y0 = pad + r * (tile + pad + title_h) + (tile - h) // 2
        sheet.paste(img.resize((w, h), resample), (x0, y0))
        for k, box in enumerate(boxes[i] if boxes is not None else []):
            name = labels[i][k] if labels is not None else ""
            colour = palette.setdefault(name, class_colour(name))
            bx0, by0, bx1, by1 = (x0 + box[0] * scale, y0 + box[1] * scale, x0 + box[2] * scale, y0 + box[3] * scale)
            draw.rectangle([bx0, by0, bx1 - 1, by1 - 1], outline=colour, width=2)
            if name:
                tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), name, font=small)
                ty = by0 - (ty1 - ty0) - 4 if by0 - (ty1 - ty0) - 4 >= y0 else by0
                draw.rectangle([bx0, ty, bx0 + (tx1 - tx0) + 4, ty + (ty1 - ty0) + 4], fill=colour)
                draw.text((bx0 + 2 - tx0, ty + 2 - ty0), name, fill=(0, 0, 0), font=small)
        if titles is not None:
            text = str(titles[i])
            tx0, _, tx1, _ = draw.textbbox((0, 0), text, font=font)
            cx = pad + c * (tile + pad) + (tile - (tx1 - tx0)) // 2
            draw.text((cx, pad + r * (tile + pad + title_h) + tile + 1), text, fill=(230, 230, 230), font=font)
    return sheet


def classification_sheet(items: list[tuple], classes: list[str], per_class: int = 8, tile: int = 96) -> Image.Image:
    """The first ``per_class`` images of every class, one row per class, titled with the class name."""
    by_class: dict[int, list] = defaultdict(list)
    for path, label in items:
        if len(by_class[int(label)]) < per_class:
            by_class[int(label)].append(path)
    images, titles = [], []
    for label, name in enumerate(classes):
        for path in by_class.get(label, []):
            with Image.open(path) as im:
                images.append(im.convert("RGB"))
            titles.append(name)
    return contact_sheet(images, titles=titles, cols=per_class, tile=tile)


def coco_sheet(
    coco: dict, image_root: str | os.PathLike | None = None, num_images: int = 16, cols: int = 4, tile: int = 256
) -> Image.Image:
    """The first ``num_images`` images of a COCO dict with their boxes and class names."""
    root = Path(image_root if image_root is not None else coco.get("info", {}).get("image_root", "."))
    names = {c["id"]: c["name"] for c in coco["categories"]}
    anns: dict[int, list] = defaultdict(list)
    for a in coco.get("annotations", []):
        anns[a["image_id"]].append(a)
    images, boxes, labels, titles = [], [], [], []
    for info in coco["images"][:num_images]:
        with Image.open(root / info["file_name"]) as im:
            images.append(im.convert("RGB"))
        mine = anns.get(info["id"], [])
        boxes.append(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in mine]
        )
        labels.append([names[a["category_id"]] for a in mine])
        titles.append(f"{info['file_name']}  ({len(mine)} boxes)")
    return contact_sheet(
        images, boxes, labels, titles=titles, cols=cols, tile=tile, class_names=[c["name"] for c in coco["categories"]]
    )
