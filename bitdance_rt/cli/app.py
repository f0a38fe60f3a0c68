"""The two typer apps, ``bitdance-rt`` and ``bitdance-export``, and the CLI's error policy;
each command module of this package adds its commands to them.

Thin typer layers over the library: they parse, call :mod:`bitdance_rt.runtime` and
:mod:`bitdance_rt.export`, and print. Every error a user can cause is one line on stderr and
exit status 2; Ctrl-C is one line and 130; a traceback only with ``--debug`` (anywhere on the
command line) or ``BITDANCE_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys

import click
import typer
from typer.core import TyperGroup

from ..errors import BitDanceError

DEBUG = {"on": False}

# typer >= 0.2x carries its own copy of click: catch the parser's errors from either
_USAGE = tuple({click.exceptions.ClickException,
                *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})
_EXIT = tuple({click.exceptions.Exit, typer.Exit})
_ABORT = tuple({KeyboardInterrupt, click.exceptions.Abort, typer.Abort})


class Commands(TyperGroup):
    """The CLI's error policy (see the module docstring), wrapped around every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:  # typer turns it into a silent exit 130: say it once
            typer.echo("interrupted", err=True)
            raise

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False
        DEBUG["on"] = bool(os.environ.get("BITDANCE_DEBUG"))
        try:
            result = super().main(*args, **kwargs)
        except BitDanceError as e:
            if DEBUG["on"]:
                raise
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        except _ABORT:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except _USAGE as e:  # wrong options or values: click's usage message, exit 2
            e.show()
            sys.exit(e.exit_code)
        except _EXIT as e:
            sys.exit(e.exit_code)
        except Exception as e:  # a bug: one line unless --debug
            if DEBUG["on"]:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            typer.echo(f"internal error: {type(e).__name__}: {first[:300]} (a bug in "
                       "bitdance-rt; rerun with --debug for the traceback)", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


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
