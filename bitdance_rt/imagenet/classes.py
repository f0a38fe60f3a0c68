"""The 1000 ImageNet-1k classes (``classes.txt``: line i is class i, its WordNet id and its
names, comma-separated, as in the ILSVRC 2012 synset mapping) and the ``--class`` argument.

A class is given by its index, its WordNet id (``n01440764``) or any of its names, in any
case, with spaces or underscores (``great white shark``, ``Great_White_Shark``). A name that
belongs to several classes (``crane``: the bird and the machine) is refused with the indices to
choose from; an unknown one with the closest names.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

from ..errors import RequestError

CLASSES_FILE = Path(__file__).with_name("classes.txt")
IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def synsets() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(wordnet_id, names)`` of each class, by index."""
    out = []
    for line in CLASSES_FILE.read_text(encoding="utf-8").splitlines():
        wnid, names = line.split(" ", 1)
        out.append((wnid, tuple(n.strip() for n in names.split(","))))
    if len(out) != IMAGENET_CLASSES:
        raise RuntimeError(f"{CLASSES_FILE} lists {len(out)} classes, not 1000")
    return tuple(out)


def class_name(index: int) -> str:
    """The first name of a class (``str(index)`` for a model with other classes)."""
    if 0 <= index < IMAGENET_CLASSES:
        return synsets()[index][1][0]
    return str(index)


def _key(text: str) -> str:
    return re.sub(r"[\s_]+", " ", text.strip().lower())


@functools.lru_cache(maxsize=1)
def _by_name() -> dict[str, tuple[int, ...]]:
    table: dict[str, list[int]] = {}
    for i, (wnid, names) in enumerate(synsets()):
        for key in {_key(wnid), *(_key(n) for n in names)}:
            table.setdefault(key, []).append(i)
    return {k: tuple(v) for k, v in table.items()}


def resolve_class(value: str, num_classes: int = IMAGENET_CLASSES) -> int:
    """The class index of ``--class`` (see the module docstring); :class:`RequestError`
    naming the fix otherwise."""
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if not 0 <= index < num_classes:
            raise RequestError(f"--class {text}: the model has classes 0 to {num_classes - 1}")
        return index
    if num_classes != IMAGENET_CLASSES:
        raise RequestError(f"--class {text!r}: this model has {num_classes} classes, not the "
                           "ImageNet ones, so classes are given by index (0 to "
                           f"{num_classes - 1})")
    found = _by_name().get(_key(text))
    if found and len(found) == 1:
        return found[0]
    if found:
        choices = ", ".join(f"{i} ({synsets()[i][0]}: {', '.join(synsets()[i][1][:2])})"
                            for i in found)
        raise RequestError(f"--class {text!r} names {len(found)} classes: {choices}; give "
                           "the index")
    close = difflib.get_close_matches(_key(text), list(_by_name()), n=3, cutoff=0.6)
    hint = ("; did you mean " + ", ".join(f"{c!r} ({_by_name()[c][0]})" for c in close) + "?"
            if close else "")
    raise RequestError(f"--class {text!r} is not an ImageNet class name{hint} (or give an "
                       f"index, 0 to {num_classes - 1})")
