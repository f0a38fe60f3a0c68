"""Command lines: ``bitdance-rt`` (generate, ...) and ``bitdance-export`` (export, check,
make-tiny, ...): thin typer layers over the library, one module per command family
(``app.py`` holds the two apps and the error policy)."""

from . import export, generate, quant, sample, score, serve  # noqa: F401  (register commands)
from .app import export_app, rt_app

__all__ = ["export_app", "rt_app", "rt_entry", "export_entry"]


def rt_entry():
    rt_app()


def export_entry():
    export_app()
