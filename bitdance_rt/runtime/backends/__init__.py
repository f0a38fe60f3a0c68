"""Backends of the AR loop: one file each, the same five calls (see ``runtime/backend.py``)."""
