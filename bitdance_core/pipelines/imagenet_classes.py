"""The 1000 ImageNet class names in index order, and parsing of class lists ("3,7", "goldfish", [3, 7]).

Data: data/imagenet_classes.txt (see data/README.md for how it was made).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

from ..errors import BitDanceError

_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "imagenet_classes.txt")


@functools.lru_cache(maxsize=1)
def _names() -> tuple[str, ...]:
    with open(_FILE, encoding="utf-8") as f:
        names = tuple(line.rstrip("\n") for line in f if line.strip())
    if len(names) != 1000:
        raise BitDanceError(f"{_FILE}: expected 1000 ImageNet class names, found {len(names)}")
    return names


def imagenet_class_names() -> list[str]:
    """['tench', 'goldfish', ..., 'toilet tissue']: index i is ImageNet class i."""
    return list(_names())


def model_class_names(num_classes: int) -> list[str]:
    """A class-conditional model's class names: ImageNet's for a 1000-class model, else the class
    numbers ("0" .. "9" for the digits demo, whose class i is the digit i)."""
    return imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]


def class_label(index: int, name: str) -> str:
    """How a node lists a class: '207: golden retriever', or just '7' when the name is the number."""
    return name if name == str(index) else f"{index}: {name}"


def parse_class_label(label: str) -> int:
    """The class index of a label written by class_label ('207: golden retriever', '7')."""
    head = str(label).split(":", 1)[0].strip()
    if not head.isdigit():
        raise BitDanceError(f"class '{label}': expected '<index>: <name>' or '<index>' as the node lists them")
    return int(head)


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, int]:
    return {n.lower(): i for i, n in enumerate(_names())}


def class_index(name: str) -> int:
    """The id of an ImageNet class name (case-insensitive), e.g. 'golden retriever' -> 207."""
    key = " ".join(str(name).strip().lower().split())
    if key in _index():
        return _index()[key]
    words = key.split()
    close = ([n for n in _names() if words and all(w in n.lower() for w in words)]
             or [n for n in _names() if any(len(w) > 3 and w in n.lower() for w in words)])[:5]
    hint = f"; did you mean {close}?" if close else ""
    raise BitDanceError(f"'{name}' is not an ImageNet class name{hint} (or give the class id 0-999)")


def parse_classes(classes: Sequence[int | str] | int | str, num_classes: int | None = 1000,
                  allow_null: bool = False) -> list[int]:
    """Class ids from ids, digit strings, ImageNet names, or one comma-separated string of those.
    With allow_null, id == num_classes (the unconditional "null" class) is accepted. num_classes None:
    the model is not read yet, so only the spelling is checked (names as ImageNet's, ids as >= 0), which
    lets a command refuse a misspelt name before it spends time loading a checkpoint."""
    if isinstance(classes, str):
        items = [c for c in classes.split(",") if c.strip()]
    elif isinstance(classes, int):
        items = [classes]
    else:
        items = list(classes)
    if not items:
        raise BitDanceError("no class given: pass class ids such as 3,7 (or ImageNet names)")
    top = None if num_classes is None else num_classes if allow_null else num_classes - 1
    out = []
    for c in items:
        if isinstance(c, bool):
            raise BitDanceError(f"class {c!r} is not a class id")
        if isinstance(c, str) and c.strip().lstrip("-").isdigit():
            c = int(c.strip())
        if isinstance(c, str):
            if num_classes not in (None, 1000):
                raise BitDanceError(f"class '{c}': this model has {num_classes} classes, not ImageNet's 1000; give ids 0-{num_classes - 1}")
            c = class_index(c)
        if not isinstance(c, int) and hasattr(c, "__index__"):
            c = int(c)
        if not isinstance(c, int):
            raise BitDanceError(f"class {c!r} is not a class id: give an integer or an ImageNet class name")
        if top is None and c < 0:
            raise BitDanceError(f"class {c} is negative: class ids start at 0")
        if top is not None and not 0 <= c <= top:
            raise BitDanceError(f"class {c!r} is out of range: this model has classes 0-{num_classes - 1}"
                                + (f" (and {num_classes} = unconditional)" if allow_null else ""))
        out.append(c)
    return out
