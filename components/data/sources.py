"""Readers for every data source the pipeline accepts, and the datasets the stages train on.

* an ImageFolder tree (``root/<class>/<image>``, torchvision's ``find_classes``/``make_dataset``),
* CIFAR-10 in its python-pickle batch format (optionally downloaded by torchvision's helpers),
* any COCO-format detection set (instances JSON + an images directory),
* the prepared data of the data contract: ``data/classification/index.json`` and COCO JSONs with
  ``info.image_root``.

Bad input raises :class:`DataError` (a ``ValueError``) with one line naming the file and the entry.
Where a source may hold a few bad entries, ``on_error="skip"`` drops them and the reader returns how
many it dropped per reason, for the prepare stage to record.
"""

from __future__ import annotations

import copy
import io
import math
import os
import pickle
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from components.io import read_json


class DataError(ValueError):
    """Bad input data; the message is one line naming the file and the entry."""


def _check_on_error(on_error: str) -> None:
    if on_error not in ("error", "skip"):
        raise ValueError(f"on_error must be 'error' or 'skip', got {on_error!r}")


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as RGB; a missing, corrupt or truncated file is a DataError."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable image ({_one_line(e)})") from None


def content_hash(path: str | os.PathLike) -> str:
    """A short SHA-256 of a file's bytes: recorded per source image in the prepared indexes, so an
    added, removed or changed image changes the index (and DVC re-runs what depends on it)."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def check_root(root: str | os.PathLike | None, declared: str, index: str | os.PathLike) -> Path:
    """The directory that ``index`` declares its image paths relative to (named ``declared``, a params
    key); a missing one is a one-line DataError naming the key and the path."""
    if root is None:
        raise DataError(f"{index}: its image paths are relative to {declared}, which is not set")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{declared}: {root} not found (the images of {index} are relative to it)")
    return root


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------
def read_image_folder(
    root: str | os.PathLike, check_images: bool = True, on_error: str = "error"
) -> tuple[list[str], list[tuple[str, int]], dict[str, int]]:
    """Classes (sorted folder names), [(absolute path, label)] and skipped counts of an ImageFolder tree.

    With ``check_images`` every image is decoded once; an unreadable one is a DataError, or with
    ``on_error="skip"`` is left out and counted under ``unreadable_images``. A class folder without
    images is an error, or counted under ``empty_classes`` (the class keeps its label). Fewer than two
    classes with images is always an error: there is nothing to classify.
    """
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    _check_on_error(on_error)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    try:
        classes, class_to_idx = find_classes(str(root))
    except FileNotFoundError:
        raise DataError(f"{root}: no class folders inside (expected root/<class>/<image>)") from None
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    skipped = {"unreadable_images": 0, "empty_classes": 0}
    present = {label for _, label in samples}
    for name in classes:
        if class_to_idx[name] not in present:
            if on_error == "error":
                raise DataError(f"{root / name}: class folder has no images ({', '.join(IMG_EXTENSIONS)})")
            skipped["empty_classes"] += 1
    items: list[tuple[str, int]] = []
    for path, label in samples:
        if check_images:
            try:
                open_image(path)
            except DataError:
                if on_error == "error":
                    raise
                skipped["unreadable_images"] += 1
                continue
        items.append((path, int(label)))
    if not items:
        raise DataError(f"{root}: no readable images")
    with_images = sorted({classes[label] for _, label in items})
    if len(with_images) < 2:
        raise DataError(
            f"{root}: {len(with_images)} class folder(s) with images ({', '.join(with_images)}); "
            "classification needs at least 2 (root/<class>/<image>)"
        )
    return classes, items, skipped


# --------------------------------------------------------------------------------------------
# CIFAR-10
# --------------------------------------------------------------------------------------------
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST = ["test_batch"]


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch format only: builtins plus numpy arrays; any other global is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _load_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path}: CIFAR-10 file not found (pass download=True, or point root at the directory holding "
            f"{CIFAR10_DIR}/)"
        )
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 -- any failure to parse is a bad file
        raise DataError(f"{path}: not a CIFAR-10 batch ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (top-level object is {type(obj).__name__}, expected dict)")
    # pickles written by Python 2 may have bytes keys
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def read_cifar10(
    root: str | os.PathLike, train: bool, download: bool = False
) -> tuple[list[str], np.ndarray, list[int]]:
    """(class names, images uint8 [N, 32, 32, 3], labels) of the CIFAR-10 train or test split.

    Reads ``root/cifar-10-batches-py/`` with a restricted unpickler (numpy arrays and builtins only),
    then checks the structure (3072 bytes per image, labels in 0..9). ``download=True`` fetches the
    archive with torchvision's ``download_and_extract_archive``, which checks the archive's MD5; the
    extracted batches are not MD5-checked, so copies and test fixtures in the same format are accepted.
    """
    root = Path(root).expanduser()
    base = root / CIFAR10_DIR
    if download and not (base / "batches.meta").is_file():
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    if not base.is_dir():
        raise DataError(f"{base}: CIFAR-10 directory not found (pass download=True, or point root at its parent)")
    meta_path = base / "batches.meta"
    meta = _load_cifar_pickle(meta_path)
    classes = meta.get("label_names")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, (str, bytes)) for c in classes):
        raise DataError(f"{meta_path}: 'label_names' missing or not a list of names")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in classes]
    images, labels = [], []
    for name in CIFAR10_TRAIN if train else CIFAR10_TEST:
        path = base / name
        batch = _load_cifar_pickle(path)
        data, lab = batch.get("data"), batch.get("labels", batch.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}"
            raise DataError(f"{path}: 'data' must be a uint8 array [N, 3072], got {got.strip()}")
        if lab is None or len(lab) != len(data):
            raise DataError(f"{path}: 'labels' missing or its length differs from 'data' ({len(data)} images)")
        lab = [int(x) for x in lab]
        bad = [x for x in lab if not 0 <= x < len(classes)]
        if bad:
            raise DataError(f"{path}: label {bad[0]} outside 0..{len(classes) - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # [N, 32, 32, 3]
        labels.extend(lab)
    return classes, np.ascontiguousarray(np.concatenate(images)), labels


def write_array_images(
    root: str | os.PathLike, subdir: str, images: np.ndarray, labels: list[int], classes: list[str]
) -> list[list]:
    """Write images uint8 [N, H, W, 3] as ``root/subdir/<class>/<i>.png``; return [[path relative to root, label]]."""
    root = Path(root)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    items = []
    for i, (img, label) in enumerate(zip(images, labels)):
        rel = f"{subdir}/{classes[label]}/{i:05d}.png"
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(img, "RGB").save(tmp, format="PNG")
        os.replace(tmp, path)
        items.append([rel, int(label)])
    return items


# --------------------------------------------------------------------------------------------
# COCO instances
# --------------------------------------------------------------------------------------------
BOX_TOLERANCE = 1.0  # px a box may poke out of its image (rounding in real annotations); clipped


def _skip_counts() -> dict[str, int]:
    return {
        k: 0
        for k in (
            "images_missing_keys",
            "images_duplicate_id",
            "images_missing_file",
            "images_unreadable",
            "images_size_mismatch",
            "annotations_missing_keys",
            "annotations_duplicate_id",
            "annotations_missing_image",
            "annotations_unknown_category",
            "annotations_zero_area",
            "annotations_outside_image",
            "annotations_of_skipped_images",
        )
    }


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def _is_id(v) -> bool:
    """A COCO id: an integer, as the format defines it and pycocotools indexes by it."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def validate_coco(
    coco: dict,
    source: str,
    image_dir: str | os.PathLike | None = None,
    on_error: str = "error",
    check_images: bool = False,
) -> tuple[dict, dict[str, int]]:
    """Check a COCO instances dict and return (cleaned copy, skipped counts per reason).

    Errors (DataError naming ``source`` and the entry): missing top-level keys; categories without an
    integer id and a name or with duplicate ids (always fatal); images without an integer id, a file
    name, integer width/height, or with a duplicate id; annotations without integer id/image_id/
    category_id and a bbox, pointing to a missing image or an unknown category, with zero width/height,
    outside their image by more than ``BOX_TOLERANCE`` px, or with an ``iscrowd`` other than 0/1 or a
    negative ``area``. With ``image_dir`` every image file must exist (and, with ``check_images``,
    decode to the declared width and height).
    ``on_error="skip"`` drops bad images (with their annotations) and bad annotations instead.
    The cleaned copy has boxes clipped to their image, ``area`` (w*h when absent) and ``iscrowd`` filled.
    """
    _check_on_error(on_error)
    if not isinstance(coco, dict):
        raise DataError(f"{source}: a COCO file must hold a JSON object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in coco:
            raise DataError(f"{source}: missing key '{key}'")
        if not isinstance(coco[key], list):
            raise DataError(f"{source}: '{key}' must be a list, got {type(coco[key]).__name__}")
    skipped = _skip_counts()

    def fail(reason: str, message: str) -> None:
        if on_error == "error":
            raise DataError(f"{source}: {message}")
        skipped[reason] += 1

    cat_ids: set = set()
    for i, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DataError(f"{source}: categories[{i}] needs keys 'id' and 'name'")
        if not _is_id(c["id"]) or not isinstance(c["name"], str):
            raise DataError(
                f"{source}: categories[{i}] needs an integer 'id' and a string 'name', got {c['id']!r}, {c['name']!r}"
            )
        if c["id"] in cat_ids:
            raise DataError(f"{source}: categories[{i}] duplicate category id {c['id']}")
        cat_ids.add(c["id"])

    image_dir = Path(image_dir) if image_dir is not None else None
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"{source}: image directory {image_dir} not found")
    images: dict = {}
    for i, im in enumerate(coco["images"]):
        missing = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if missing:
            fail("images_missing_keys", f"images[{i}] missing key(s) {', '.join(repr(k) for k in missing)}")
            continue
        if not _is_id(im["id"]) or not isinstance(im["file_name"], str) or not im["file_name"]:
            fail(
                "images_missing_keys",
                f"images[{i}] needs an integer 'id' and a file name, got id {im['id']!r}, file_name "
                f"{im['file_name']!r}",
            )
            continue
        if not (_positive_int(im["width"]) and _positive_int(im["height"])):
            fail(
                "images_missing_keys",
                f"images[{i}] (id={im['id']}) width/height must be positive integers, got "
                f"{im['width']!r}x{im['height']!r}",
            )
            continue
        if im["id"] in images:
            fail("images_duplicate_id", f"images[{i}] duplicate image id {im['id']}")
            continue
        if image_dir is not None:
            path = image_dir / im["file_name"]
            if not path.is_file():
                fail("images_missing_file", f"images[{i}] (id={im['id']}) file {path} not found")
                continue
            if check_images:
                try:
                    size = open_image(path).size
                except DataError as e:
                    fail("images_unreadable", f"images[{i}] (id={im['id']}) {e}")
                    continue
                if size != (im["width"], im["height"]):
                    fail(
                        "images_size_mismatch",
                        f"images[{i}] (id={im['id']}) {path} is {size[0]}x{size[1]}, "
                        f"but the entry says {im['width']}x{im['height']}",
                    )
                    continue
        images[im["id"]] = dict(im)
    raw_image_ids = {im.get("id") for im in coco["images"] if isinstance(im, dict) and _is_id(im.get("id"))}

    annotations, ann_ids = [], set()
    for i, a in enumerate(coco["annotations"]):
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if not isinstance(a, dict) or k not in a]
        if missing:
            fail("annotations_missing_keys", f"annotations[{i}] missing key(s) {', '.join(repr(k) for k in missing)}")
            continue
        where = f"annotations[{i}] (id={a['id']})"
        if not all(_is_id(a[k]) for k in ("id", "image_id", "category_id")):
            fail(
                "annotations_missing_keys",
                f"{where} id, image_id and category_id must be integers, "
                f"got {a['id']!r}, {a['image_id']!r}, {a['category_id']!r}",
            )
            continue
        if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd"), (bool, float)):
            fail("annotations_missing_keys", f"{where} iscrowd must be 0 or 1, got {a['iscrowd']!r}")
            continue
        if "area" in a and not (_is_number(a["area"]) and a["area"] >= 0):
            fail("annotations_missing_keys", f"{where} area must be a number >= 0, got {a['area']!r}")
            continue
        if a["id"] in ann_ids:
            fail("annotations_duplicate_id", f"{where} duplicate annotation id")
            continue
        if a["image_id"] not in images:
            if a["image_id"] in raw_image_ids:  # its image was skipped above
                skipped["annotations_of_skipped_images"] += 1
            else:
                fail(
                    "annotations_missing_image", f"{where} points to image_id {a['image_id']}, which is not in 'images'"
                )
            continue
        if a["category_id"] not in cat_ids:
            fail("annotations_unknown_category", f"{where} category_id {a['category_id']} is not in 'categories'")
            continue
        box = a["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            fail("annotations_missing_keys", f"{where} bbox must be 4 finite numbers [x, y, w, h], got {box!r}")
            continue
        x, y, w, h = (float(v) for v in box)
        if w <= 0 or h <= 0:
            fail("annotations_zero_area", f"{where} bbox {box} has zero area (w and h must be > 0)")
            continue
        im = images[a["image_id"]]
        W, H = im["width"], im["height"]
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > W + t or y + h > H + t:
            fail("annotations_outside_image", f"{where} bbox {box} lies outside image {a['image_id']} ({W}x{H})")
            continue
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        if x1 <= x0 or y1 <= y0:
            fail("annotations_zero_area", f"{where} bbox {box} has zero area inside image {a['image_id']} ({W}x{H})")
            continue
        clean = dict(a)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            clean["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        clean.setdefault("area", (x1 - x0) * (y1 - y0))
        clean.setdefault("iscrowd", 0)
        ann_ids.add(a["id"])
        annotations.append(clean)

    cleaned = {k: copy.deepcopy(v) for k, v in coco.items() if k not in ("images", "annotations", "categories")}
    cleaned["images"] = list(images.values())
    cleaned["annotations"] = annotations
    cleaned["categories"] = [dict(c) for c in coco["categories"]]
    return cleaned, skipped


def read_coco(
    path: str | os.PathLike,
    on_error: str = "error",
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
) -> tuple[dict, dict[str, int]]:
    """Read and validate a COCO instances JSON; return (coco, skipped counts).

    The images directory is ``image_root`` if given, else ``info.image_root`` relative to the JSON's
    directory, else the JSON's directory; it is written back, absolute, as ``info.image_root``. A file
    whose ``info.root`` names a declared root (a params key, as prepare writes for external images)
    needs ``image_root``: a missing one is a DataError naming the key.
    """
    path = Path(path)
    try:
        coco = read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: a COCO file must hold a JSON object, got {type(coco).__name__}")
    info = coco.get("info") if isinstance(coco.get("info"), dict) else {}
    if isinstance(info.get("root"), str):  # written by prepare: file names relative to a declared root
        image_root = check_root(image_root, info["root"], path)
    elif image_root is None:
        image_root = info.get("image_root", ".")
        if not isinstance(image_root, str):
            raise DataError(f"{path}: info.image_root must be a path string, got {image_root!r}")
    root = (path.parent / Path(image_root).expanduser()).resolve()
    cleaned, skipped = validate_coco(coco, str(path), image_dir=root, on_error=on_error, check_images=check_images)
    cleaned["info"] = {**info, "image_root": str(root)}
    return cleaned, skipped


def load_coco(
    path: str | os.PathLike,
    on_error: str = "error",
    image_root: str | os.PathLike | None = None,
    check_images: bool = False,
) -> dict:
    """:func:`read_coco` without the skipped counts."""
    return read_coco(path, on_error=on_error, image_root=image_root, check_images=check_images)[0]


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO dict with their boxes, in the torchvision detection format.

    Item: (image float [3, H, W] in [0, 1], {"boxes": float [K, 4] xyxy (a ``tv_tensors.BoundingBoxes``,
    so transforms v2 move them with the image), "labels": int64 [K] category ids, "image_id": int}).
    Crowd annotations (iscrowd=1) are left out. ``transforms(image, target)`` is applied last.
    """

    def __init__(self, coco: dict, image_root: str | os.PathLike | None = None, transforms=None):
        self.root = Path(image_root if image_root is not None else coco.get("info", {}).get("image_root", "."))
        self.images = list(coco["images"])
        self.transforms = transforms
        self.anns: dict = defaultdict(list)
        for a in coco.get("annotations", []):
            if not a.get("iscrowd", 0):
                self.anns[a["image_id"]].append(a)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from torchvision import tv_tensors
        from torchvision.transforms.functional import pil_to_tensor

        info = self.images[i]
        path = self.root / info["file_name"]
        img = open_image(path)
        if (img.width, img.height) != (info["width"], info["height"]):
            raise DataError(
                f"{path}: image is {img.width}x{img.height} but its COCO entry (id={info['id']}) says "
                f"{info['width']}x{info['height']}"
            )
        image = pil_to_tensor(img).float().div_(255.0)  # [3, H, W]
        anns = self.anns.get(info["id"], [])
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)  # [K, 4]
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)  # [K, 4] xyxy
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(img.height, img.width)),
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64),
            "image_id": int(info["id"]),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


# --------------------------------------------------------------------------------------------
# Classification index (data contract) and its dataset
# --------------------------------------------------------------------------------------------
@dataclass
class ClassificationIndex:
    source: str
    classes: list[str]
    image_size: int
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]


def load_classification_index(
    path: str | os.PathLike, check_files: bool = True, root: str | os.PathLike | None = None
) -> ClassificationIndex:
    """Read ``index.json``. Relative paths resolve against its directory, or, where the index declares
    ``"root"`` (the params key of an external dataset's directory, e.g. ``prepare.classification.root``),
    against ``root``, which must then be given and exist. Entries are ``[path, label]`` or
    ``[path, label, content hash]``. Errors name the file (or the root's key) and the entry."""
    path = Path(path)
    try:
        index = read_json(path)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(str(e)) from None
    if not isinstance(index, dict):
        raise DataError(f"{path}: expected a JSON object")
    for key in ("classes", "image_size", "train", "val"):
        if key not in index:
            raise DataError(f"{path}: missing key '{key}'")
    classes = index["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a non-empty list of names")
    if not _positive_int(index["image_size"]):
        raise DataError(f"{path}: 'image_size' must be a positive integer, got {index['image_size']!r}")
    declared = index.get("root")
    if declared is not None and not isinstance(declared, str):
        raise DataError(f"{path}: 'root' must name the params key of the images' directory, got {declared!r}")
    base = check_root(root, declared, path) if declared else path.parent
    splits = {}
    for split in ("train", "val"):
        items = []
        if not isinstance(index[split], list):
            raise DataError(f"{path}: '{split}' must be a list of [path, label]")
        for i, entry in enumerate(index[split]):
            if not (
                isinstance(entry, (list, tuple))
                and len(entry) in (2, 3)
                and isinstance(entry[0], str)
                and isinstance(entry[1], int)
                and 0 <= entry[1] < len(classes)
                and (len(entry) == 2 or isinstance(entry[2], str))
            ):
                raise DataError(
                    f"{path}: {split}[{i}] must be [path, label in 0..{len(classes) - 1}] "
                    f"(+ content hash), got {entry!r}"
                )
            p = Path(entry[0])
            p = p if p.is_absolute() else base / p
            if check_files and not p.is_file():
                raise DataError(f"{path}: {split}[{i}] image {p} not found")
            items.append((p, entry[1]))
        splits[split] = items
    return ClassificationIndex(
        source=str(index.get("source", "")),
        classes=list(classes),
        image_size=int(index["image_size"]),
        train=splits["train"],
        val=splits["val"],
    )


class ImageListDataset(torch.utils.data.Dataset):
    """(path, label) pairs -> (``transform``(PIL RGB image), label); a corrupt file is a DataError naming it."""

    def __init__(self, items, transform=None):
        self.items = [(Path(p), int(label)) for p, label in items]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = open_image(path)
        return (self.transform(img) if self.transform is not None else img), label
