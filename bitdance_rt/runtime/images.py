"""Writing generated images: PNG files with the settings in their text metadata, checked
before the work starts and written atomically (a temporary name in the same directory, renamed
into place when complete, so an interrupted save never leaves a truncated image)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..errors import BitDanceError
from ..files import atomic_path, check_writable_dir


class OutputError(BitDanceError):
    """An output location that cannot be written, or a format that would lose the settings."""


def output_paths(out: Path, n: int) -> list[Path]:
    """``out`` for one image; ``stem_0.png`` ... for several."""
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def check_output(out, n: int) -> list[Path]:
    """The paths ``n`` images will be written to, after checking that they can be: a PNG name
    (PNG keeps the settings in its metadata), not a directory, in a directory that exists or
    can be made and is writable. Raises :class:`OutputError` naming the fix."""
    out = Path(out)
    if out.is_dir() or str(out).endswith(os.sep):
        raise OutputError(f"--out {out} is a directory; name the image file, e.g. "
                          f"{out / 'bitdance.png'}")
    if out.suffix.lower() != ".png":
        hint = out.with_suffix(".png") if out.suffix else Path(f"{out}.png")
        raise OutputError(f"--out {out}: images are written as PNG (which keeps the prompt and "
                          f"settings in its metadata); name the file {hint}")
    paths = output_paths(out, n)
    for p in paths:
        if p.is_dir():
            raise OutputError(f"{p} is a directory; choose another --out")
    try:
        check_writable_dir(out.parent if str(out.parent) else Path("."))
    except BitDanceError as e:
        raise OutputError(f"cannot write the image: {e}; choose another --out") from None
    return paths


def write_png(image, fp, meta: dict) -> None:
    """``image`` (uint8 HxWx3 array) as a PNG with ``meta`` as text chunks, to a path or a
    binary file object: the one writer of the format (files, server responses)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, str(v))
    Image.fromarray(image).save(fp, format="PNG", pnginfo=info)


def png_bytes(image, meta: dict) -> bytes:
    buf = io.BytesIO()
    write_png(image, buf, meta)
    return buf.getvalue()


def save_png(image, path: Path, meta: dict) -> None:
    """``image`` to ``path`` (see :func:`write_png`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        write_png(image, tmp, meta)
