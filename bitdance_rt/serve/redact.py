"""No answer tells a client where the server keeps its files: every message that can carry a
server path (a failed load, a failed run, a library error) passes through :func:`redact`,
which keeps only the last part of each absolute path, quoted (spaces and all) or not (the
checkpoint's directory name is the model's name). The server's own routes (``/v1/models``
...) are kept."""

from __future__ import annotations

import re

# a quoted absolute path (spaces and all), as Python's file errors quote them
_QUOTED = re.compile(r"""(['"])((?:/|[A-Za-z]:\\)[^'"\n]*[/\\][^'"\n]*)\1""")
# an absolute POSIX path of two or more parts, or a Windows one; not inside a word or a URL's host
_PATH = re.compile(r"(?<![\w.~-])(?:/[^\s/'\"`<>|;:,()\[\]{}=]+){2,}/?"
                   r"|(?<![\w])[A-Za-z]:\\[^\s'\"`<>|;,()\[\]{}=]+")
_ROUTES = {"/v1/images/generations", "/v1/models"}  # the server's own, named in its messages


def redact(text: str, known: dict[str, str] | None = None) -> str:
    """``text`` with each of ``known``'s paths replaced by its name, then every other absolute
    path by its last part."""
    for path, name in sorted((known or {}).items(), key=lambda kv: -len(kv[0])):
        if path:
            text = text.replace(path, name)
    text = _QUOTED.sub(lambda m: m.group(1) + _last_part(m.group(2)) + m.group(1), text)
    return _PATH.sub(lambda m: _last_part(m.group(0)), text)


def _last_part(path: str) -> str:
    return path if path in _ROUTES else _name(path)


def _name(path: str) -> str:
    parts = [p for p in re.split(r"[/\\]", path) if p]
    return parts[-1] if parts else path
