"""Writing generated images: PNG files with the settings in their text metadata, checked
before the work starts and written atomically (a temporary name in the same directory, renamed
into place when complete, so an interrupted save never leaves a truncated image)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..errors import BitDanceError
from ..files import atomic_paths, check_room


class OutputError(BitDanceError):
    """An output location that cannot be written, or a format that would lose the settings."""


def output_paths(out: Path, n: int) -> list[Path]:
    """``out`` for one image; ``stem_0.png`` ... for several."""
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def png_size_bound(height: int, width: int) -> int:
    """The most bytes a PNG of an RGB image of this size takes (stored without compression,
    a filter byte a row, chunk framing and the settings' text)."""
    return height * (width * 3 + 1) + height * width * 3 // 16000 * 5 + 64 * 1024


def check_output(out, n: int, size: tuple[int, int] | None = None) -> list[Path]:
    """The paths ``n`` images will be written to, after checking that they can be: a PNG name
    (PNG keeps the settings in its metadata), not a directory, in a directory that exists or
    can be made and is writable, with names the file system can hold and (``size``: height,
    width) room for all ``n``. Raises :class:`OutputError` naming the fix."""
    out = Path(out)
    if out.is_dir() or str(out).endswith(os.sep):
        raise OutputError(f"--out {out} is a directory; name the image file, e.g. "
                          f"{out / 'bitdance.png'}")
    if out.suffix.lower() != ".png":
        hint = out.with_suffix(".png") if out.suffix else Path(f"{out}.png")
        raise OutputError(f"--out {out}: images are written as PNG (which keeps the prompt and "
                          f"settings in its metadata); name the file {hint}")
    paths = output_paths(out, n)
    bound = png_size_bound(*size) if size else 0
    try:
        check_room({p: bound for p in paths}, "--out")
    except BitDanceError as e:
        raise OutputError(str(e)) from None
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


def save_pngs(images, paths, meta: dict) -> None:
    """``images[i]`` to ``paths[i]`` with ``meta`` and its ``image_index`` (see
    :func:`write_png`): all or nothing (a failure or an interrupt leaves no new file)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(paths) as tmps:
        for i, tmp in enumerate(tmps):
            write_png(images[i], tmp, {**meta, "image_index": i})

