"""The two typer apps, ``bitdance-rt`` and ``bitdance-export``, and the CLI's error policy;
each command module of this package adds its commands to them.

Thin typer layers over the library: they parse, call :mod:`bitdance_rt.runtime` and
:mod:`bitdance_rt.export`, and print. Every error a user can cause is one line on stderr and
exit status 2 (a :class:`~bitdance_rt.errors.BitDanceError`, which the library raises for
everything it reads from the user, or a read or write the system refused); Ctrl-C is one line
and 130; any other exception is a bug in bitdance-rt: one line saying so and exit 1; a
traceback only with ``--debug`` (anywhere on the command line) or ``BITDANCE_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from typer.core import TyperCommand, TyperGroup

from .. import signals
from ..errors import BitDanceError

DEBUG = {"on": False}

# typer >= 0.2x carries its own copy of click: catch the parser's errors from either
_USAGE = tuple({click.exceptions.ClickException,
                *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})
_EXIT = tuple({click.exceptions.Exit, typer.Exit})
_ABORT = tuple({KeyboardInterrupt, click.exceptions.Abort, typer.Abort})


def one_line(e: BaseException) -> str:
    """An error's message on one line (a value quoted from a user's file may hold newlines)."""
    return " ".join(str(e).split())


def signal_name(code: int) -> str:
    import signal

    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return f"signal {code - 128}"


def _interrupted(e: BaseException):
    """Say that a signal stopped the command, in one line, and exit 128 + its number."""
    signum = signals.received()
    code = signals.exit_code(e) if signum is None else 128 + signum
    typer.echo("interrupted" if code == 130 else f"interrupted ({signal_name(code)})", err=True)
    sys.exit(code)


def internal_error(e: BaseException):
    """Say that ``e`` is a bug in one line, and exit 1."""
    first = (str(e).strip().splitlines() or [""])[0]
    typer.echo(f"internal error: {type(e).__name__}: {first[:300]} (a bug in "
               "bitdance-rt; rerun with --debug for the traceback)", err=True)
    sys.exit(1)


class Commands(TyperGroup):
    """The CLI's error policy (see the module docstring), wrapped around every command."""

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        DEBUG["on"] = bool(os.environ.get("BITDANCE_DEBUG"))
        with signals.handled():  # SIGINT and SIGTERM: one line and 128 + the signal, any time
            try:
                self._main(*args, **kwargs)
            except KeyboardInterrupt as e:  # while an error was being reported
                sys.stderr.write("interrupted\n")
                sys.exit(signals.exit_code(e))

    def parse_args(self, ctx, args):  # the group's own options (bitdance-export's)
        raw = list(args)
        rest = super().parse_args(ctx, args)
        check_values(ctx, raw)
        return rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:  # typer turns it into a silent exit 130: remember it
            self._stopped = e
            raise

    def _main(self, *args, **kwargs):
        self._stopped = None
        try:
            result = super().main(*args, **kwargs)
            if self._stopped is not None:
                _interrupted(self._stopped)
            signals.check()  # an interrupt that was lost on the way still stops with its code
        except BitDanceError as e:
            if DEBUG["on"]:
                raise
            typer.echo(f"error: {one_line(e)}", err=True)
            sys.exit(2)
        except OSError as e:  # the system refused a read or write: the user's files or disk
            if DEBUG["on"]:
                raise
            if e.errno is None:
                internal_error(e)
            where = f" ({e.filename})" if e.filename else ""
            typer.echo(f"error: {e.strerror or one_line(e)}{where}; check the path, its "
                       "permissions and the free space", err=True)
            sys.exit(2)
        except MemoryError:  # torch.OutOfMemoryError is a RuntimeError, said by the backends
            if DEBUG["on"]:
                raise
            typer.echo("error: out of memory; ask for fewer or smaller images, or free memory",
                       err=True)
            sys.exit(2)
        except _ABORT as e:
            _interrupted(e)
        except _USAGE as e:  # wrong options or values: click's usage message, exit 2
            e.show()
            sys.exit(e.exit_code)
        except _EXIT as e:
            sys.exit(e.exit_code)
        except Exception as e:  # a bug: one line unless --debug
            if DEBUG["on"]:
                raise
            internal_error(e)
        sys.exit(result if isinstance(result, int) else 0)


INT_LIMIT = 2**63 - 1  # the largest integer any option takes (seeds, counts, sizes)


def check_values(ctx, args) -> None:
    """Rules every command's values follow, before the command runs: no empty (or
    white-space-only) value, given to an option or as an argument (an empty ``--attention`` or
    ``--out`` would otherwise fall back to a default the user did not ask for), and no integer
    past 64 bits (``--per-class 2**64``). BitDanceError naming the option."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        if value.strip() or (arg.startswith("-") and "=" not in arg):
            continue
        prev = args[i - 1] if i and args[i - 1].startswith("-") and "=" not in args[i - 1] \
            else arg.split("=", 1)[0] if arg.startswith("--") else None
        what = prev if prev else "an argument"
        raise BitDanceError(f"{what} is empty; give it a value, or leave the option out")
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_LIMIT:
                name = param.opts[0] if param.opts else param.name
                raise BitDanceError(f"{name} {v} is too large (at most {INT_LIMIT}); pass a "
                                    "smaller number")


class Command(TyperCommand):
    """A command whose usage line names its arguments plainly (``EXPORT_DIR``, not typer's
    ``{EXPORT_DIR}``, which reads as a placeholder left in the text), and whose values follow
    :func:`check_values`."""

    def parse_args(self, ctx, args):
        raw = list(args)
        rest = super().parse_args(ctx, args)
        check_values(ctx, raw)
        return rest

    def collect_usage_pieces(self, ctx):
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p.replace("{", "")
                .replace("}", "") for p in super().collect_usage_pieces(ctx)]


rt_app = typer.Typer(cls=Commands, add_completion=False, no_args_is_help=True,
                     rich_markup_mode=None,
                     help="Generate images with BitDance over a choice of backends.")
export_app = typer.Typer(cls=Commands, add_completion=False, invoke_without_command=True,
                         rich_markup_mode=None,
                         help="Export BitDance checkpoints to deployable graphs; make test models.")


def _debug_option(value: bool):
    if value:
        DEBUG["on"] = True


DEBUG_OPTION = typer.Option(False, "--debug", help="Show tracebacks.", callback=_debug_option,
                            is_eager=True)


@rt_app.callback()
def rt_main(debug: bool = DEBUG_OPTION):
    """Generate images with BitDance over a choice of backends."""
