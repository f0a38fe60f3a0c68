"""Files and directories written safely: every output goes to a temporary name in its own
directory and is renamed into place only when complete, and a directory of outputs is built
in a staging directory that replaces the old one in one step. An interrupted run leaves either
the old result or the new one, never a mix or a truncated file; and a directory of outputs
replaces only what an earlier run of the same command wrote there: anything else in it (the
user's notes, engines built from an export) is kept.

What a user hands over is read here too: every JSON file through :func:`read_json` (size,
depth, UTF-8 and type checks: :func:`check_schema`), and every file name that a manifest or an
index lists through :func:`inside` (no absolute paths, no ``..``, no symbolic links leading out
of the directory)."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath
from typing import Callable

from . import signals
from .errors import BitDanceError

# What a temporary name adds to an output's name: ``.NAME.XXXXXXXX.partial`` (files) and
# ``.NAME.XXXXXXXX.staging`` (directories), so an output's name must be this much shorter than
# the file system's longest name.
TEMP_NAME_EXTRA = len("..") + 8 + len(".partial")
# Free space kept beyond the outputs' expected size (file system metadata, rounding of the
# estimate, other writers): this much, plus 5% of the size
SPACE_RESERVE = 1 << 20
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_dir(d: Path) -> None:
    """``d`` exists and is writable, or can be created (its nearest existing ancestor is a
    writable directory). Raises BitDanceError naming the reason."""
    d = Path(d)
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BitDanceError(f"{probe} is a file, not a directory")
    try:  # a real write: permissions, read-only mounts and full disks all show here
        fd, tmp = tempfile.mkstemp(prefix=".bitdance-write-check.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BitDanceError(f"{probe} is not writable ({e.strerror})") from None


def no_space(e: OSError, path) -> BitDanceError:
    """The one-line error for a write the disk had no room for."""
    return BitDanceError(f"no space left for {Path(path).name} in {Path(path).parent} "
                         f"({e.strerror}); nothing was written: free some space or choose "
                         "another place")


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yields a temporary path beside ``path``; when the block completes it is renamed to
    ``path`` (replacing it), and on any error or interruption it is removed."""
    with atomic_paths([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths):
    """All or nothing: yields a temporary path beside each of ``paths``; when the block
    completes they are renamed into place together (a signal waits until all are), and on any
    error or interruption every temporary file is removed and no output is touched."""
    paths = [Path(p) for p in paths]
    tmps = []
    try:
        for path in paths:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial",
                                       dir=path.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield tmps
        with signals.held():
            signals.check()  # an interrupt lost on the way stops the commit
            for tmp in tmps:  # mkstemp makes it private; give it a file's usual mode
                os.chmod(tmp, 0o666 & ~_umask())
            for tmp, path in zip(tmps, paths):
                os.replace(tmp, path)
    except BaseException as e:
        with signals.held():
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise no_space(e, paths[min(len(tmps), len(paths)) - 1]) from None
        raise


def free_bytes(d: Path) -> int:
    """Bytes an unprivileged writer may still use on ``d``'s file system."""
    st = os.statvfs(d)
    return st.f_bavail * st.f_frsize


def _nearest_existing(p: Path) -> Path:
    p = Path(os.path.abspath(p))
    while not os.path.lexists(p) and p.parent != p:
        p = p.parent
    return p


def _name_max(d: Path) -> int:
    try:
        return os.pathconf(d, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _mb(n: int) -> str:
    if n < 10**6:
        return f"{n / 1e3:,.0f} kB"
    return f"{n / 1e6:,.1f} MB" if n < 10**9 else f"{n / 1e9:,.2f} GB"


def check_room(outputs, what: str = "--out", files: bool = True) -> None:
    """Before any work: each output (``{path: expected bytes}``; files, or with ``files``
    False directories) can be put in place: no directory where a file goes, no file where a
    directory must be made, names the file system can hold with their temporary names, room
    for all of them on each file system they go to, and write permission. Raises
    BitDanceError naming the fix."""
    need = {}
    for path, size in dict(outputs).items():
        path = Path(os.path.abspath(path))  # ".." and "a/.." name the directory they reach
        if not path.name.strip():
            raise BitDanceError(f"{what} {str(path)!r} has no name (only spaces); name the "
                                "output")
        base = _nearest_existing(path.parent)
        if not base.is_dir():
            raise BitDanceError(f"{base} is a file, so {what} {path} cannot be made there; "
                                "choose another place")
        nmax = _name_max(base)
        rest = path.relative_to(base).parts
        for i, part in enumerate(rest):
            extra = TEMP_NAME_EXTRA if i == len(rest) - 1 else 0
            if len(os.fsencode(part)) + extra > nmax:
                raise BitDanceError(
                    f"{what}: the name {_one_line(part, 60)!r} is too long for the file system "
                    f"({len(os.fsencode(part))} bytes; at most {nmax - extra} here"
                    f"{', as it is first written under a longer temporary name' if extra else ''}"
                    "); choose a shorter name")
        if files and path.is_dir():
            raise BitDanceError(f"{what} {path} is a directory; name a file")
        dev = os.stat(base).st_dev
        need.setdefault(dev, [base, 0])[1] += int(size or 0)
    for base, n in need.values():
        try:
            check_writable_dir(base)
        except BitDanceError as e:
            raise BitDanceError(f"cannot write {what}: {e}; choose a writable place") from None
        if not n:  # nothing known yet of the size: the name and place only
            continue
        free = free_bytes(base)
        if n + n // 20 + SPACE_RESERVE > free:
            raise BitDanceError(
                f"not enough free space for {what}: it needs about {_mb(n)} and {base} has "
                f"{_mb(free)} free; free some space or choose another place")


# What an earlier output in a directory consists of: ``owned(d, writes)`` gives the names (entries
# of ``d``) that the command wrote there and may replace, ``writes`` being the names the new
# output has. Everything else in ``d`` belongs to the user.
Owned = Callable[[Path, set], set]


def check_output_dir(out: Path, what: str, marker: str, owned: Owned | None = None,
                     writes: set = frozenset(), size: int = 0) -> None:
    """``out`` may be written by a command that makes a directory of outputs: it is new, empty,
    or an earlier output of the same kind (it holds ``marker``, and ``owned`` can tell its
    files), in which the new output (whose names ``writes`` lists, as far as known before the
    work) replaces no file the command did not write; and its parent can take about ``size``
    bytes more (:func:`check_room`). Checked before the work; :func:`staged_directory`
    checks again when it puts the result in place."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BitDanceError(f"--out {out} is a file; name a new or empty directory")
    if out.is_dir() and any(out.iterdir()):
        if not (out / marker).is_file():
            raise BitDanceError(
                f"--out {out} is not empty and holds no {marker}, so it is not an earlier "
                f"{what}; bitdance-export replaces only its own outputs: name a new or empty "
                "directory")
        if owned is not None and marker not in owned(out, set(writes)):
            raise BitDanceError(
                f"--out {out} holds a {marker} that cannot be read, so it is not an earlier "
                f"{what}; bitdance-export replaces only its own outputs: name a new or empty "
                "directory")
        _kept(out, owned, set(writes), what)
    check_room({out: size}, f"--out {out}", files=False)  # the staging directory: beside out


def _kept(final: Path, owned: Owned | None, writes: set, what: str = "output") -> list[str]:
    """The entries of ``final`` that the new output keeps (see :func:`staged_directory`)."""
    if not final.exists() and not final.is_symlink():
        return []
    if not final.is_dir():
        raise BitDanceError(f"{final} is a file, not a directory; name a new or empty directory")
    entries = sorted(p.name for p in final.iterdir())
    if not entries:
        return []
    if owned is None:
        raise BitDanceError(f"{final} is not empty; name a new or empty directory (nothing "
                            "is written over files this command did not write)")
    mine = owned(final, writes)
    keep = [n for n in entries if n not in mine]
    clash = [n for n in keep if n in writes]
    if clash:
        raise BitDanceError(
            f"{final} holds {', '.join(clash)}, which the new {what} writes but an earlier "
            f"run did not write (they are not in its records); move "
            f"{'it' if len(clash) == 1 else 'them'} out of {final} and run again")
    return keep


def _usual_modes(root: Path) -> None:
    """Give every file under ``root`` a file's usual mode under the umask: some writers
    (safetensors, mkstemp) make their files private to the user."""
    mask = _umask()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, (0o777 if st.st_mode & 0o111 else 0o666) & ~mask)


@contextlib.contextmanager
def staged_directory(final: Path, owned: Owned | None = None, what: str = "output"):
    """Yields an empty staging directory beside ``final``; when the block completes the
    staging directory replaces ``final`` in one rename, and on any error or interruption the
    staging directory is removed and ``final`` is untouched.

    Nothing in ``final`` that this command did not write is deleted: ``owned(final, writes)``
    names the entries of an earlier output that may be replaced (``writes``: the names of the
    new output); every other entry is moved into the new directory before it takes
    ``final``'s place, and a name that both have is refused (BitDanceError, ``final``
    untouched). ``owned`` None: ``final`` must be new or empty."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".staging", dir=final.parent))
    os.chmod(stage, 0o777 & ~_umask())
    old, moved = None, []
    try:
        yield stage
        with signals.held():  # the renames run to their end; a signal is raised after them
            signals.check()  # an interrupt lost on the way stops the commit
            _usual_modes(stage)
            keep = _kept(final, owned, {p.name for p in stage.iterdir()}, what)
            if final.exists() or final.is_symlink():
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old",
                                            dir=final.parent))
                os.replace(final, old)
            for name in keep:  # the user's files go into the new directory
                os.rename(old / name, stage / name)
                moved.append(name)
            os.replace(stage, final)
    except BaseException as e:
        with signals.held():
            for name in reversed(moved):  # and back, before anything is removed
                with contextlib.suppress(OSError):
                    os.rename(stage / name, old / name)
            if old is not None and not final.exists():
                os.replace(old, final)  # interrupted between the renames: put it back
                old = None
            if old is not None:
                with contextlib.suppress(OSError):
                    old.rmdir()  # made, but final was never moved there
            if not any((stage / n).exists() or (stage / n).is_symlink() for n in moved):
                shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise BitDanceError(f"no space left writing {final} ({e.strerror}); nothing was "
                                "written: free some space or choose another place") from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # only what the earlier run wrote is left there


# ----------------------------------------------------------------------------------------------
# Reading what a user hands over: JSON files, names inside a directory


MAX_JSON_BYTES = 64 << 20  # the largest JSON file read (configs, manifests, indexes)
MAX_JSON_DEPTH = 32         # the deepest nesting of arrays and objects (the project's: <= 7)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(error, where: str, problem: str, fix: str):
    raise error(f"{where} {problem}" + (f"; {fix}" if fix else "")) from None


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (without parsing it: no
    recursion, whatever the depth). Brackets inside strings do not count."""
    depth = peak = 0
    for c in _NOT_BRACKET.sub("", _STRING.sub('""', text)):
        if c in "[{":
            depth += 1
            peak = max(peak, depth)
        else:
            depth -= 1
    return peak


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text, where: str, *, error=BitDanceError, fix: str = "",
               max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES,
               schema=None, allow_nan: bool = False):
    """JSON ``text`` (str, or bytes that must be UTF-8) parsed with limits: at most
    ``max_bytes`` long and ``max_depth`` levels deep, standard numbers only (no NaN or
    Infinity), and of the shape ``schema`` describes (:func:`check_schema`) when given. Every
    problem is one ``error`` naming ``where`` and ``fix``. ``allow_nan``: take NaN and
    Infinity as numbers (for a caller that checks every number's range itself)."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        if len(text) > max_bytes:
            _fail(error, where, f"is {len(text)} bytes long, more than the {max_bytes} "
                  "accepted", fix)
        try:
            text = bytes(text).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            _fail(error, where, f"is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
                  f"{e.start})", fix)
    elif len(text) > max_bytes:
        _fail(error, where, f"is {len(text)} characters long, more than the {max_bytes} "
              "accepted", fix)
    depth = json_depth(text)
    if depth > max_depth:
        _fail(error, where, f"is nested {depth} levels deep, more than the {max_depth} a "
              "bitdance-rt JSON file can have", fix)
    try:
        value = json.loads(text, parse_constant=None if allow_nan else _reject_constant)
    except RecursionError:  # json_depth counted an unterminated string's brackets short
        _fail(error, where, "is nested too deeply to be read", fix)
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers of > 4300 digits
        _fail(error, where, f"is not valid JSON ({_one_line(e)})", fix)
    if schema is not None:
        check_schema(value, schema, where, error=error, fix=fix)
    return value


def read_json(path, what: str = "file", *, error=BitDanceError, fix: str = "",
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH,
              schema=None) -> dict:
    """The JSON object in file ``path``: the one reader of every JSON file bitdance-rt reads.
    The file must exist, be at most ``max_bytes`` long, UTF-8, valid JSON at most
    ``max_depth`` levels deep, hold an object, and match ``schema`` (:func:`check_schema`)
    when given. Every problem is one ``error`` (a BitDanceError class) naming the ``what``
    at ``path`` and ``fix``."""
    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    try:
        size = path.stat().st_size
        if not stat.S_ISREG(path.stat().st_mode):
            _fail(error, where, "is not a file", fix)
        if size > max_bytes:
            _fail(error, where, f"is {size} bytes long, more than the {max_bytes} a "
                  "bitdance-rt JSON file can be", fix)
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as e:
        _fail(error, where, f"cannot be read ({e.strerror or _one_line(e)})", fix)
    value = parse_json(raw, where, error=error, fix=fix, max_depth=max_depth,
                       max_bytes=max_bytes)
    if not isinstance(value, dict):
        _fail(error, where, f"must hold a JSON object ({{...}}), not a JSON "
              f"{_json_kind(value)}", fix)
    if schema is not None:
        check_schema(value, schema, where, error=error, fix=fix)
    return value


# -- the shapes of JSON documents ----------------------------------------------------------------


class Optional_:
    """A key that may be missing (``Opt(schema)`` in a schema's object)."""

    def __init__(self, schema):
        self.schema = schema


def Opt(schema) -> Optional_:  # noqa: N802  (reads as a type in a schema)
    return Optional_(schema)


class MapOf:
    """An object with any keys (checked by ``key``, a schema for strings) whose values all
    match ``value``."""

    def __init__(self, value, key=str):
        self.value, self.key = value, key


class Nullable:
    """``schema`` or null."""

    def __init__(self, schema):
        self.schema = schema


class Check:
    """A value that matches ``schema`` and passes ``test(value)`` (``what`` says what it must
    be)."""

    def __init__(self, schema, test, what: str):
        self.schema, self.test, self.what = schema, test, what


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object" if isinstance(value, dict) else type(value).__name__


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
          list: "an array", dict: "an object", object: "any value", None: "null"}


def _describe(schema) -> str:
    if isinstance(schema, Nullable):
        return f"{_describe(schema.schema)} or null"
    if isinstance(schema, Check):
        return schema.what
    if isinstance(schema, MapOf):
        return f"an object {{name: {_describe(schema.value)}, ...}}"
    if isinstance(schema, list):
        return f"an array [{_describe(schema[0])}, ...]"
    if isinstance(schema, dict):
        return "an object"
    if isinstance(schema, tuple):
        return " or ".join(_describe(s) for s in schema)
    return _KINDS.get(schema, str(schema))


def _matches(value, kind) -> bool:
    if kind is object:
        return True
    if kind is None:
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    return isinstance(value, kind)


def check_schema(value, schema, where: str, *, error=BitDanceError, fix: str = "",
                 at: str = "") -> None:
    """Raise ``error`` (one line: ``where``, the key path, what it must be, what it is, and
    ``fix``) unless ``value`` has the shape of ``schema``:

    - ``int``, ``float`` (any finite number), ``str``, ``bool``, ``list``, ``dict``,
      ``object`` (anything), ``None`` (null);
    - ``{key: schema, key: Opt(schema)}``: an object with these keys (others allowed);
    - ``[schema]``: an array of such values; ``MapOf(schema)``: an object of such values;
    - ``Nullable(schema)``, ``(a, b)`` (either), ``Check(schema, test, what)``.
    """
    def fail(message):
        raise error(f"{where}{message}" + (f"; {fix}" if fix else "")) from None

    def wrong(expected):
        fail(f": {at or 'the document'} must be {expected}, not {_short(value)}")

    if isinstance(schema, Nullable):
        if value is not None:
            check_schema(value, schema.schema, where, error=error, fix=fix, at=at)
        return
    if isinstance(schema, Check):
        check_schema(value, schema.schema, where, error=error, fix=fix, at=at)
        try:
            ok = schema.test(value)
        except (TypeError, ValueError, ArithmeticError):
            ok = False
        if not ok:
            wrong(schema.what)
        return
    if isinstance(schema, tuple):
        for s in schema:
            try:
                check_schema(value, s, where, error=BitDanceError, at=at)
                return
            except BitDanceError:
                continue
        wrong(_describe(schema))
    if isinstance(schema, list):
        if not isinstance(value, list):
            wrong(_describe(schema))
        for i, v in enumerate(value):
            check_schema(v, schema[0], where, error=error, fix=fix, at=f"{at}[{i}]")
        return
    if isinstance(schema, MapOf):
        if not isinstance(value, dict):
            wrong(_describe(schema))
        for k, v in value.items():
            check_schema(k, schema.key, where, error=error, fix=fix, at=f"{at} key {k!r}")
            check_schema(v, schema.value, where, error=error, fix=fix, at=_key(at, k))
        return
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            wrong("an object")
        for k, s in schema.items():
            optional = isinstance(s, Optional_)
            if k not in value:
                if not optional:
                    fail(f" lacks the key {_key(at, k)!r}")
                continue
            check_schema(value[k], s.schema if optional else s, where, error=error, fix=fix,
                         at=_key(at, k))
        return
    if not _matches(value, schema):
        wrong(_describe(schema))


def _key(at: str, k) -> str:
    return f"{at}.{k}" if at else str(k)


def _short(value) -> str:
    text = repr(value)
    return f"{_json_kind(value)} {text if len(text) <= 60 else text[:57] + '...'}"


# -- names inside a directory ---------------------------------------------------------------------


def is_plain_name(name) -> bool:
    """``name`` is a relative path that stays inside its directory by its spelling: not empty,
    not absolute, no ``..`` or ``.`` parts, no backslashes, no NUL, and of a length every file
    system takes (255 bytes a part, 1024 in all)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        return False
    p = PurePosixPath(name)
    return not p.is_absolute() and len(name.encode("utf-8", "surrogateescape")) <= 1024 and all(
        part not in ("", ".", "..") and len(part.encode("utf-8", "surrogateescape")) <= 255
        for part in name.split("/"))


def is_path_text(text) -> bool:
    """``text`` can name a path on any file system: a string without NUL of at most 4096
    bytes, each part at most 255."""
    if not isinstance(text, str) or not text or "\x00" in text:
        return False
    raw = text.encode("utf-8", "surrogateescape")
    return len(raw) <= 4096 and all(len(part) <= 255 for part in raw.split(b"/"))


PATH_TEXT = Check(str, is_path_text, "a path (no NUL, at most 255 bytes a part)")
PLAIN_NAME = Check(str, is_plain_name, "a file name inside the directory (relative, without "
                   "'..')")


def inside(d, name, what: str = "file", *, error=BitDanceError, fix: str = "") -> Path:
    """``d / name`` for a ``name`` that a file of ``d`` (a manifest, an index) lists: the name
    must be relative without ``..`` (:func:`is_plain_name`) and the path, symbolic links
    followed, must stay inside ``d``. Raises ``error`` naming the name and ``fix`` otherwise."""
    d = Path(d)
    if not is_plain_name(name):
        _fail(error, f"{what} {name!r}", f"named in {d} is not a plain file name inside it "
              "(absolute paths and '..' are refused)", fix)
    path = d / name
    try:
        real, base = path.resolve(), d.resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop
        _fail(error, f"{what} {path}", f"cannot be resolved ({_one_line(e)})", fix)
    if real != base and base not in real.parents:
        _fail(error, f"{what} {path}", f"leads out of {d} (a symbolic link to {real}); "
              "bitdance-rt reads only files inside the directory", fix)
    return path
