"""The console scripts ``bitdance-rt`` and ``bitdance-export``: the signal policy of
:mod:`bitdance_rt.signals` is in place before anything is imported, so Ctrl-C or SIGTERM even
while the command line starts (importing torch takes a second or two) is one line and 128 + the
signal's number, never a traceback."""

from __future__ import annotations

import signal
import sys

from . import signals


def _run(name: str) -> None:
    with signals.handled(after=signal.SIG_IGN):  # the process exits after the command
        try:
            from . import cli

            (cli.rt_app if name == "rt" else cli.export_app)()
        except KeyboardInterrupt as e:  # before the command's own policy took over
            sys.stderr.write("interrupted\n" if signals.exit_code(e) == 130
                             else f"interrupted ({e})\n")
            sys.exit(signals.exit_code(e))


def rt() -> None:
    _run("rt")


def export() -> None:
    _run("export")
