"""How a command stops on Ctrl-C (SIGINT) or SIGTERM, at any moment.

While a command runs (:func:`handled`, entered by the CLI around every command but ``serve``,
which drains instead), both signals raise :class:`Interrupted`, a KeyboardInterrupt, in the main
thread, and the signal is remembered: Python drops an exception raised where it cannot propagate
(inside a finalizer, or a callback from native code such as a TensorRT build): inside a
finalizer, a weak-reference callback or an import the signal is not raised but delivered again
a moment later, :func:`check` raises one that was lost at the next point that commits an output
(the rename that puts a file or a directory in place), and native work that takes long asks
:func:`received` between its steps. Short sections that must not be cut in the middle (the renames of a set of outputs,
and their undoing) run under :func:`held`: a signal that arrives there is raised when the
section ends. The CLI prints one line and exits 128 + the signal's number (130 for Ctrl-C, 143
for SIGTERM); what was being written is removed (``files.atomic_path``, ``staged_directory``),
so an interrupted command leaves the old outputs or the new ones, never a part.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)

_state = {"signum": None, "held": 0, "pending": False, "active": False, "deferred": None}


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal (a KeyboardInterrupt, so ``except Exception`` never
    swallows it)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(e: BaseException) -> int:
    """The exit status for an interrupt ``e`` (130 when it carries no signal)."""
    return getattr(e, "exit_code", 128 + signal.SIGINT)


# Where an exception raised by the handler would not propagate, or would abort the process: a
# finalizer or weak-reference callback (Python drops it: "Exception ignored in ..."), and an
# import (an extension module's initialisation calls back into Python from native code, where
# an exception terminates the process). There the signal is raised a moment later (SIGALRM
# from a timer), in the first frame that is none of these.
_UNSAFE_FILES = ("weakref.py", "_weakrefset.py", "/torch/utils/weak.py", "importlib/_bootstrap",
                 "<frozen importlib._bootstrap")
_REDELIVER_S = 0.05


def _unsafe(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or any(u in code.co_filename for u in _UNSAFE_FILES):
            return True
        frame = frame.f_back
    return False


def _handler(signum, frame):
    _state["signum"] = signum
    if _state["held"]:
        _state["pending"] = True
        return
    if _unsafe(frame):  # try again in a moment (a timer's SIGALRM: no thread, no lock)
        _state["deferred"] = signum
        signal.setitimer(signal.ITIMER_REAL, _REDELIVER_S)
        return
    raise Interrupted(signum)


def _again(_alarm, frame):
    signum = _state.get("deferred")
    if signum is None:
        return
    if _state["held"]:
        _state.update(deferred=None, pending=True)
        return
    if _unsafe(frame):
        signal.setitimer(signal.ITIMER_REAL, _REDELIVER_S)
        return
    _state["deferred"] = None
    raise Interrupted(signum)


@contextlib.contextmanager
def handled(after=None):
    """Both signals raise :class:`Interrupted` in this block (main thread only; elsewhere,
    and when already inside such a block, nothing changes). The handlers before it are put
    back afterwards, or ``after`` (a process that is exiting: ``signal.SIG_IGN``, so that a
    signal during the interpreter's shutdown does not turn a finished command into a killed
    one)."""
    if threading.current_thread() is not threading.main_thread() or _state["active"]:
        yield
        return
    previous = {sig: signal.getsignal(sig) if after is None else after for sig in HANDLED}
    previous[signal.SIGALRM] = signal.getsignal(signal.SIGALRM)
    _state.update(signum=None, held=0, pending=False, active=True, deferred=None)
    try:
        for sig in HANDLED:
            signal.signal(sig, _handler)
        signal.signal(signal.SIGALRM, _again)
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        _state.update(signum=None, held=0, pending=False, active=False, deferred=None)


def received() -> int | None:
    """The signal received since the command started, if any (for loops in native code that
    cannot be interrupted otherwise: stop between steps)."""
    return _state["signum"]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def check() -> None:
    """Raise :class:`Interrupted` if a signal came and its exception was lost on the way (in
    the main thread, where signals are handled; elsewhere nothing: a server's loader or worker
    thread is stopped by the server)."""
    if _state["signum"] is not None and _main_thread():
        raise Interrupted(_state["signum"])


@contextlib.contextmanager
def held():
    """A section a signal must not cut: one that arrives inside is raised when it ends (main
    thread only: another thread's section cannot hold the main thread's signals)."""
    if not _main_thread():
        yield
        return
    _state["held"] += 1
    try:
        yield
    finally:
        _state["held"] -= 1
        if not _state["held"] and _state["pending"]:
            _state["pending"] = False
            raise Interrupted(_state["signum"])


def _record(signum, frame):
    _state["signum"] = signum


def record_only() -> bool:
    """From here on both signals are only recorded (:func:`received`): for a server, whose own
    handlers take over and which decides how to stop. False when no :func:`handled` block is
    active (nothing changed)."""
    if not _main_thread() or not _state["active"]:
        return False
    signal.setitimer(signal.ITIMER_REAL, 0)
    _state["deferred"] = None
    for sig in HANDLED:
        signal.signal(sig, _record)
    return True


def clear() -> None:
    """Forget a recorded signal (one that a server has answered by draining)."""
    _state.update(signum=None, pending=False, deferred=None)
