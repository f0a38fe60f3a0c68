"""bitdance-rt: deployment toolkit for the BitDance text-to-image model."""

__version__ = "0.1.0"
