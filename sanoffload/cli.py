"""Command line entry point: ``sanoffload <command> ...``.

Error policy: a :class:`~sanoffload.errors.SanoffloadError` becomes one line
on stderr (``sanoffload: error: <message>``) and its exit code; anything else
is a bug and exits 1 with one line, or with the traceback under ``--debug``
(or ``SANOFFLOAD_DEBUG=1``).  SIGTERM, SIGHUP and SIGINT raise
:class:`~sanoffload.errors.Interrupted` so cleanup runs, then exit 130.

Adding a command: write it in its own module with ``@click.command()`` (use
:data:`pass_app` to get the runner) and add ``"name": "module:attribute"`` to
:data:`LAZY_COMMANDS`.  It is imported only when invoked, so a broken optional
dependency of one command cannot break ``doctor``.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from . import __version__
from .errors import CompletedWithWarnings, SanoffloadError
from .requirements import ROLES
from .runner import CommandRunner, Runner
from .signals import install_signal_handlers
from .text import printable

if TYPE_CHECKING:
    # doctor imports every tool wrapper (it checks what they run): seconds on a slow
    # host, paid by every command if imported here, so only `doctor` imports it
    from .doctor import Host, Report

log = logging.getLogger("sanoffload")

#: command name -> "module:attribute" of a click command, imported on first use
LAZY_COMMANDS: dict[str, str] = {
    "agent": "sanoffload.agent.cli:agent",
    "store": "sanoffload.store.cli:store",
    "storage": "sanoffload.storage.cli:storage",
    "backup": "sanoffload.proxy.cli:backup",
    "list": "sanoffload.proxy.cli:list_",
    "verify": "sanoffload.proxy.cli:verify",
    "restore": "sanoffload.proxy.cli:restore",
    "prune": "sanoffload.proxy.cli:prune",
    "proxy": "sanoffload.proxy.cli:proxy",
    "install-units": "sanoffload.install_units:install_units",
    "key": "sanoffload.store.keycli:key",
    "mount": "sanoffload.store.mountcli:mount",
    "umount": "sanoffload.store.mountcli:umount",
}


def make_runner() -> Runner:
    """The runner every command uses; unit tests replace this factory."""
    return CommandRunner()


def make_host(runner: Runner) -> Host:
    """Where doctor looks (the real /); unit tests replace this factory."""
    from .doctor import Host

    return Host(runner)


def run_checks(role: str, host: Host) -> Report:
    """doctor's checks for ROLE on HOST; unit tests replace this."""
    from .doctor import run_checks as checks

    return checks(role, host)


@dataclass
class App:
    """Per-invocation state handed to commands through click's context object."""

    debug: bool = False
    verbose: int = 0
    runner: Runner | None = None

    def get_runner(self) -> Runner:
        if self.runner is None:
            self.runner = make_runner()
        return self.runner


pass_app = click.make_pass_decorator(App, ensure=True)


class LazyGroup(click.Group):
    """A group that also lists commands named in a mapping and imports them when used."""

    def __init__(self, *args: Any, lazy_commands: Mapping[str, str] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the mapping itself, not a copy: entries added to LAZY_COMMANDS later still count
        self.lazy_commands = lazy_commands if lazy_commands is not None else {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            module_name, _, attr = self.lazy_commands[cmd_name].partition(":")
            cmd = getattr(importlib.import_module(module_name), attr)
            if not isinstance(cmd, click.Command):
                raise TypeError(f"{self.lazy_commands[cmd_name]} is not a click command")
            return cmd
        return super().get_command(ctx, cmd_name)


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever sys.stderr is now (click's test runner swaps it)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def setup_logging(verbose: int, debug: bool) -> None:
    """Log sanoffload's own records to stderr: WARNING, -v INFO, -vv or --debug DEBUG."""
    if debug or verbose >= 2:
        level = logging.DEBUG
    else:
        level = logging.INFO if verbose else logging.WARNING
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("sanoffload: %(levelname)s: %(message)s"))
        log.addHandler(handler)


def _env_debug() -> bool:
    return os.environ.get("SANOFFLOAD_DEBUG", "").lower() in {"1", "true", "yes"}


@click.group(cls=LazyGroup, lazy_commands=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="sanoffload")
@click.option("--debug", is_flag=True,
              help="Show tracebacks and debug logs (also: SANOFFLOAD_DEBUG=1).")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@pass_app
def cli(app: App, debug: bool, verbose: int) -> None:
    """Off-host backup for Linux: freeze, duplicate, export over iSCSI, back up from a proxy.

    \b
    Example:
      sanoffload doctor --role proxy
    """
    app.debug = app.debug or debug or _env_debug()
    app.verbose = verbose
    setup_logging(verbose, app.debug)


# --------------------------------------------------------------------------
# doctor
# --------------------------------------------------------------------------

_STATUS_TEXT = {"ok": "ok", "missing": "MISSING", "warn": "warn"}


def format_report(report: Report) -> str:
    """The doctor table: one row per check; missing ones say what fails without them."""
    rows = [(c.name, _STATUS_TEXT[c.status], c.detail) for c in report.checks]
    name_w = max(len("CHECK"), *(len(r[0]) for r in rows))
    status_w = max(len("STATUS"), *(len(r[1]) for r in rows))
    indent = " " * (name_w + status_w + 4)
    lines = [f"{'CHECK':<{name_w}}  {'STATUS':<{status_w}}  DETAIL"]
    for check, (name, status, detail) in zip(report.checks, rows, strict=True):
        lines.append(f"{name:<{name_w}}  {status:<{status_w}}  {detail}")
        if not check.present:
            lines.append(f"{indent}without it: {check.fails_without}")
    if report.ok:
        summary = f"role {report.role}: everything required is present"
        if report.warnings:
            summary += f" (optional missing: {', '.join(report.warnings)})"
    else:
        summary = f"role {report.role}: missing {', '.join(report.missing)}"
    lines.append("")
    lines.append(summary)
    return "\n".join(lines)


@cli.command()
@click.option("--role", type=click.Choice(ROLES), required=True,
              help="Which host this is: agent (first server), proxy, store or storage node.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON: role, ok, exit_code, missing, warnings, checks "
                   "(each: name, what, status, present, optional, detail, fails_without).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="The role's configuration file (storage: /etc/sanoffload/storage.toml).")
@pass_app
def doctor(app: App, role: str, as_json: bool, config_path: str | None) -> None:
    """Check that this host has the tools and kernel features ROLE needs.

    Exits 0 when everything required is present, 4 when something is missing
    (optional items only warn).

    \b
    Examples:
      sanoffload doctor --role agent
      sanoffload doctor --role storage --json
    """
    host = make_host(app.get_runner())
    if config_path is not None:
        host.config = config_path
    report = run_checks(role, host)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    error = report.error()
    if error is not None:
        raise error


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def _error_line(message: str, what: str = "error") -> str:
    # one line whatever the message holds, so scripts can grep stderr; a peer's
    # message may carry terminal escapes, which are shown, not obeyed
    return f"sanoffload: {what}: " + printable(" ".join(message.split()))


def run(argv: Sequence[str] | None = None, *, app: App | None = None) -> int:
    """Run the CLI and return the exit code (``main`` exits with it)."""
    app = app if app is not None else App(debug=_env_debug())
    restore = install_signal_handlers()
    try:
        rv = cli.main(args=list(argv) if argv is not None else None, prog_name="sanoffload",
                      obj=app, standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except SanoffloadError as exc:
        if app.debug:
            traceback.print_exc()
        # done and stored, but look: not an "error" line
        what = "warning" if isinstance(exc, CompletedWithWarnings) else "error"
        click.echo(_error_line(str(exc), what), err=True)
        return exc.exit_code
    except click.exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo(_error_line("aborted"), err=True)
        return 130
    except Exception as exc:
        if app.debug:
            traceback.print_exc()
            click.echo(_error_line(f"unexpected {type(exc).__name__}: {exc}"), err=True)
        else:
            click.echo(_error_line(f"unexpected {type(exc).__name__}: {exc} "
                                   "(run with --debug for the traceback)"), err=True)
        return 1
    finally:
        restore()


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    sys.exit(run(argv))
