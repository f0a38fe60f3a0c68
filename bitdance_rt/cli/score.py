"""``bitdance-rt score``: how well images follow a shapes prompt (the demo model's check)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import BitDanceError
from .app import DEBUG_OPTION, rt_app


MAX_PIXELS = 64 * 2**20  # 64 megapixels: far beyond any image the models make


def read_image(path: Path):
    """(RGB array, the prompt recorded in the PNG's metadata or None); one-line errors."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise BitDanceError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            recorded = getattr(im, "text", {}).get("prompt")
            if im.width * im.height > MAX_PIXELS:
                raise BitDanceError(f"{path} is {im.width}x{im.height} pixels, more than the "
                                    f"{MAX_PIXELS} `score` reads; score a smaller image")
            return np.asarray(im.convert("RGB")), recorded
    except Image.DecompressionBombError as e:
        raise BitDanceError(f"{path} is too large to read ({e}); score a smaller "
                            "image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            struct.error, IndexError, MemoryError) as e:  # PIL's errors for damaged files
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise BitDanceError(f"{path} is not a readable image ({first}); give a PNG "
                            "(or other image) file") from None


@rt_app.command("score")
def score_cmd(
    images: List[Path] = typer.Argument(..., help="PNG (or other) image files."),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="The caption every image is checked against (default: "
        "the prompt each PNG from `bitdance-rt generate` records)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results "
                                            "(per image and per attribute) as JSON here."),
    debug: bool = DEBUG_OPTION,
):
    """Check images against a caption of the demo model's grammar ('a red circle on the left,
    on a white background'): the fraction of attributes (colour, shape, position, background)
    each image shows, found by colour segmentation and shape moments, not by a model."""
    from ..demo import detect
    from ..files import atomic_path, check_writable_dir

    if json_out is not None:  # before the work: a place to write the results
        if json_out.is_dir():
            raise BitDanceError(f"--json {json_out} is a directory; name a file")
        try:
            check_writable_dir(json_out.parent)
        except BitDanceError as e:
            raise BitDanceError(f"cannot write --json {json_out}: {e}") from None
    pairs = [read_image(p) for p in images]
    captions = []
    for path, (_, recorded) in zip(images, pairs):
        caption = prompt if prompt is not None else recorded
        if caption is None:
            raise BitDanceError(f"{path} records no prompt; give one with --prompt")
        try:
            detect.parse_caption(caption)
        except ValueError as e:
            raise BitDanceError(f"{e}") from None
        captions.append(caption)
    result = detect.score([a for a, _ in pairs], captions)
    for path, caption, det in zip(images, captions, result["details"]):
        typer.echo(f"{path}: {detect.format_details(det)}"
                   + ("" if prompt is not None else f"  [{caption}]"))
    typer.echo(detect.format_score(result))
    if json_out is not None:
        rows = [{"image": str(p), "prompt": c, "attributes": d}
                for p, c, d in zip(images, captions, result["details"])]
        summary = {k: v for k, v in result.items() if k != "details"}
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps({"summary": summary, "images": rows}, indent=2))
