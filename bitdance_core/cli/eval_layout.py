"""The output folder of `eval-generate`: the benchmarks' layouts, atomic writes, the settings record.

Layouts (what the official eval scripts write, so the benchmarks' scorers read them unchanged):
- GenEval: `<out>/<index:05d>/metadata.jsonl` (the prompt's line), `samples/0000.png`, ... and
  `grid.png` (the images 2 per row);
- DPG-Bench: `<out>/<id>.png`, the images 2 per row (a 2x2 grid of 4).
Grids are torchvision's `make_grid(images, nrow=2, padding=0)` (cells left over stay black).

Every file is written to a temporary name in its folder (".<name>.<pid>-<random>.bitdance-partial":
a leading dot and no digits first, so neither scorer takes it for an image), flushed to disk and
renamed into place: a file under its final name is complete. Leftovers of a killed run are removed
when the next run starts.

The settings record (`.bitdance-eval.json`) names everything the images depend on; a run with other
settings is refused unless --overwrite (which deletes the earlier images first).
"""
from __future__ import annotations

import io
import json
import os
import re
import secrets
from dataclasses import dataclass, field

import numpy as np

from ..errors import BitDanceError
from .eval_prompts import EvalPrompt

PARTIAL = ".bitdance-partial"
RECORD = ".bitdance-eval.json"
GRID_COLUMNS = 2
_PROMPT_FOLDER = re.compile(r"\d{5,}")
_SAMPLE = re.compile(r"\d+\.png")


# ---- files ------------------------------------------------------------------------------------------

def write_atomic(path: str, data: bytes) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG, as PIL saves it by default (what torchvision's save_image writes)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def grid(images: np.ndarray, columns: int = GRID_COLUMNS) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [rows * H, min(columns, N) * W, 3], row by row; empty cells black."""
    n, h, w, c = images.shape
    cols = min(columns, n)
    rows = -(-n // cols)
    out = np.zeros((rows * h, cols * w, c), dtype=images.dtype)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        out[r * h:(r + 1) * h, k * w:(k + 1) * w] = img
    return out


def remove_partials(out: str) -> int:
    """Delete the temporary files a killed run left behind; returns how many."""
    n = 0
    for folder, _dirs, files in os.walk(out):
        for name in files:
            if name.startswith(".") and name.endswith(PARTIAL):
                os.remove(os.path.join(folder, name))
                n += 1
    return n


# ---- the layouts -------------------------------------------------------------------------------------

@dataclass
class Todo:
    """What one prompt still needs: GenEval sample numbers, the grid, the metadata file."""

    prompt: EvalPrompt
    samples: list[int] = field(default_factory=list)
    grid: bool = False
    metadata: bool = False

    @property
    def needs_images(self) -> bool:
        return bool(self.samples) or self.grid


class Layout:
    """Where a benchmark's files go, what is missing, and writing them."""

    def __init__(self, benchmark: str, out: str, images_per_prompt: int):
        if benchmark not in ("geneval", "dpg"):
            raise BitDanceError(f"benchmark '{benchmark}' unknown; choose one of ['dpg', 'geneval']")
        self.benchmark, self.out, self.n = benchmark, out, images_per_prompt

    def folder(self, p: EvalPrompt) -> str:
        return os.path.join(self.out, p.name) if self.benchmark == "geneval" else self.out

    def grid_path(self, p: EvalPrompt) -> str:
        if self.benchmark == "geneval":
            return os.path.join(self.out, p.name, "grid.png")
        return os.path.join(self.out, f"{p.name}.png")

    def sample_path(self, p: EvalPrompt, i: int) -> str:
        return os.path.join(self.out, p.name, "samples", f"{i:04d}.png")

    def metadata_path(self, p: EvalPrompt) -> str:
        return os.path.join(self.out, p.name, "metadata.jsonl")

    def todo(self, p: EvalPrompt) -> Todo:
        t = Todo(p, grid=not os.path.isfile(self.grid_path(p)))
        if self.benchmark == "geneval":
            t.samples = [i for i in range(self.n) if not os.path.isfile(self.sample_path(p, i))]
            t.metadata = not self._metadata_ok(p)
        return t

    def images_done(self, t: Todo) -> int:
        """Images of `t`'s prompt in place (a DPG-Bench grid holds all of them)."""
        if self.benchmark == "geneval":
            return self.n - len(t.samples)
        return 0 if t.grid else self.n

    def _metadata_ok(self, p: EvalPrompt) -> bool:
        try:
            with open(self.metadata_path(p), encoding="utf-8", newline="") as f:
                return f.read() == p.metadata
        except (OSError, UnicodeDecodeError):  # missing or not what we wrote: written again
            return False

    def write_metadata(self, p: EvalPrompt) -> None:
        os.makedirs(self.folder(p), exist_ok=True)
        write_atomic(self.metadata_path(p), p.metadata.encode("utf-8"))

    def write(self, t: Todo, images: np.ndarray) -> int:
        """Write what `t` lacks from its prompt's images (uint8 [n, H, W, 3]); returns the images written."""
        assert len(images) == self.n
        written = 0
        if self.benchmark == "geneval":
            os.makedirs(os.path.join(self.folder(t.prompt), "samples"), exist_ok=True)
            if t.metadata:
                self.write_metadata(t.prompt)
            for i in t.samples:
                write_atomic(self.sample_path(t.prompt, i), png_bytes(images[i]))
                written += 1
        if t.grid:
            write_atomic(self.grid_path(t.prompt), png_bytes(grid(images)))
            written += 0 if self.benchmark == "geneval" else self.n
        return written


def remove_images(out: str) -> int:
    """--overwrite: delete what either layout names (NNNNN/ folders' metadata.jsonl, grid.png and
    samples/NNNN.png; *.png at the top) and the settings record; other files stay. Returns the count."""
    n = 0

    def rm(path):
        nonlocal n
        os.remove(path)
        n += 1

    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isdir(path) and _PROMPT_FOLDER.fullmatch(name):
            for f in ("metadata.jsonl", "grid.png"):
                if os.path.isfile(os.path.join(path, f)):
                    rm(os.path.join(path, f))
            samples = os.path.join(path, "samples")
            if os.path.isdir(samples):
                for f in os.listdir(samples):
                    if _SAMPLE.fullmatch(f):
                        rm(os.path.join(samples, f))
                if not os.listdir(samples):
                    os.rmdir(samples)
            if not os.listdir(path):
                os.rmdir(path)
        elif os.path.isfile(path) and (name.endswith(".png") or name == RECORD):
            rm(path)
    return n


# ---- the settings record -----------------------------------------------------------------------------

def read_record(out: str) -> dict | None:
    path = os.path.join(out, RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError) as e:
        raise BitDanceError(f"{path}: unreadable settings record ({e}); delete it, or pass --overwrite") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("settings"), dict):
        raise BitDanceError(f"{path}: not an eval-generate settings record (no \"settings\"); delete it, or pass --overwrite")
    return rec


def claim_folder(out: str, settings: dict, info: dict, overwrite: bool) -> str:
    """Make `out` this run's folder: new, or holding a record of the same settings (a resumed run).
    Another run's settings, or files without a record, are refused unless `overwrite` (then the earlier
    images are deleted first). Returns what was done, for the console."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise BitDanceError(f"--out {out} is a file; give a folder")
    os.makedirs(out, exist_ok=True)
    partials = remove_partials(out)
    note = f"removed {partials} unfinished file{'s' if partials != 1 else ''} of an interrupted run; " if partials else ""
    rec = None if overwrite else read_record(out)
    if rec is not None and rec["settings"] == settings:
        return note + "resuming: the images already there are kept"
    if not overwrite:
        if rec is not None:
            old = rec["settings"]
            diff = "; ".join(f"{k}: {json.dumps(old.get(k))} there, {json.dumps(settings.get(k))} now"
                             for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
            raise BitDanceError(f"{out} holds images made with other settings ({diff}); use another --out, or "
                                "--overwrite to delete them and start again")
        if os.listdir(out):
            raise BitDanceError(f"{out} is not empty and has no {RECORD}: it was not made by eval-generate (or its "
                                "record was deleted); use a new or empty --out, or --overwrite to delete the benchmark "
                                "images in it (NNNNN/ folders, *.png) and start there")
    removed = remove_images(out) if overwrite else 0
    write_atomic(os.path.join(out, RECORD),
                 (json.dumps({"settings": settings, "info": info}, indent=1, sort_keys=True) + "\n").encode("utf-8"))
    return note + (f"--overwrite: deleted {removed} earlier file{'s' if removed != 1 else ''}; " if overwrite else "") \
        + "a new image set"
