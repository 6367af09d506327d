"""Atomic file writes and safe weight I/O shared by every component and stage.

Everything is written to a temporary name in the destination directory and renamed into place,
so a killed process leaves either the previous file or the new one, never half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


FILE_MODE = 0o666 & ~_umask()  # what a plain open(path, 'w') gives (mkstemp's 0600 is too strict for outputs)
DIR_MODE = 0o777 & ~_umask()  # likewise for mkdir (mkdtemp's 0700)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, FILE_MODE)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    def _write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return atomic_write(path, _write)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Save contiguous CPU copies of ``tensors`` as safetensors, atomically."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """torch.save to a temporary name, then rename (checkpoints: tensors and plain Python only)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def torch_load(path: str | os.PathLike) -> Any:
    """Load a checkpoint written by :func:`torch_save`, never unpickling arbitrary objects."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def file_digest(*paths: str | os.PathLike, suffix: str = "") -> str:
    """A short SHA-256 of the files' bytes, in order (a checkpoint fingerprint of a stage's inputs).
    A directory counts as every file under it whose name ends in ``suffix``, by sorted relative path,
    names included (a renamed or added file changes the digest)."""
    import hashlib

    h = hashlib.sha256()
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(f for f in p.rglob(f"*{suffix}") if f.is_file()):
                h.update(f.relative_to(p).as_posix().encode() + b"\0")
                h.update(f.read_bytes())
        else:
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str] | None = None) -> Path:
    """Write ``rows`` as CSV (a series for ``dvc plots``); columns default to the union of keys in order."""
    import csv
    import io

    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k, "") for k in columns})
    return write_text(path, buf.getvalue())
