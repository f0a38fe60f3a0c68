"""``bitdance-rt score``: how well images follow a shapes prompt (the demo model's check)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import BitDanceError
from .app import DEBUG_OPTION, Command, rt_app


MAX_PIXELS = 64 * 2**20  # 64 megapixels: far beyond any image the models make


def _parse(detect, caption: str) -> None:
    try:
        detect.parse_caption(caption)
    except ValueError as e:
        raise BitDanceError(f"{e}") from None


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


@rt_app.command("score", cls=Command)
def score_cmd(
    images: List[Path] = typer.Argument(..., metavar="IMAGE", help="PNG (or other) image files."),
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
    from ..files import atomic_path, check_room

    if json_out is not None:  # before the work: a place to write the results
        check_room({json_out: 1 << 20}, "--json")
    if prompt is not None:  # one caption for all: refused once, before any image is read
        _parse(detect, prompt)
    # every image that can be scored is: one that cannot is named with the reason, and the
    # command ends with an error after the others' results
    scored, skipped = [], []
    for path in images:
        try:
            array, recorded = read_image(path)
            caption = prompt if prompt is not None else recorded
            if caption is None:
                raise BitDanceError(f"{path} records no prompt; give one with --prompt")
            _parse(detect, caption)
        except BitDanceError as e:
            if len(images) == 1:
                raise
            skipped.append((path, str(e)))
            typer.echo(f"{path}: not scored: {e}")
            continue
        scored.append((path, array, caption))
    if not scored:
        raise BitDanceError(f"none of the {len(images)} images could be scored (above)")
    images = [p for p, _, _ in scored]
    captions = [c for _, _, c in scored]
    result = detect.score([a for _, a, _ in scored], captions)
    for path, caption, det in zip(images, captions, result["details"]):
        typer.echo(f"{path}: {detect.format_details(det)}"
                   + ("" if prompt is not None else f"  [{caption}]"))
    typer.echo(detect.format_score(result))
    if json_out is not None:
        rows = [{"image": str(p), "prompt": c, "attributes": d}
                for p, c, d in zip(images, captions, result["details"])]
        summary = {k: v for k, v in result.items() if k != "details"}
        rows += [{"image": str(p), "error": why} for p, why in skipped]
        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps({"summary": summary, "images": rows}, indent=2))
    if skipped:
        raise BitDanceError(f"{len(skipped)} of {len(skipped) + len(scored)} images were not "
                            "scored (named above); the results are the others'")
