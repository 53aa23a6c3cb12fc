"""``sanoffload agent ...``: the first server's commands for operators."""

from __future__ import annotations

import json
from typing import Any

import click

from ..cli import App, pass_app
from ..errors import JournalError
from ..kinds import DuplicateKind
from ..text import printable
from . import config as agent_config
from .session import Agent


def _agent(app: App, config_path: str) -> Agent:
    return Agent(app.get_runner(), agent_config.load(config_path))


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


@click.group("agent")
@click.option("--config", "config_path", default=agent_config.DEFAULT_PATH, show_default=True,
              help="The agent's configuration file.")
@click.pass_context
def agent(ctx: click.Context, config_path: str) -> None:
    """First server: duplicate a volume and expose it to a backup proxy.

    \b
    Example:
      sanoffload agent prepare /srv/data --initiator iqn.2026-11.org.example:px1 --json
      sanoffload agent release fs1-1a2b3c4d
    """
    ctx.meta["agent_config"] = config_path


def _config(ctx: click.Context) -> str:
    return str(ctx.meta.get("agent_config", agent_config.DEFAULT_PATH))


@agent.command()
@click.argument("path")
@click.option("--initiator", required=True, help="The proxy's iSCSI initiator name (IQN).")
@click.option("--kind", default=None,
              help=f"Duplicate kind: {', '.join(DuplicateKind.values())} "
                   "(default: chosen from the volume).")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@pass_app
@click.pass_context
def prepare(ctx: click.Context, app: App, path: str, initiator: str, kind: str | None,
            as_json: bool) -> None:
    """Freeze, duplicate and export PATH's volume to INITIATOR.

    \b
    Example:
      sanoffload agent prepare /srv/data --initiator iqn.2026-11.org.example:px1 --json
    """
    # parsed here, not by click: the same UsageError (exit 2, one line) as over the channel
    dup_kind = None if kind is None else DuplicateKind.parse(kind, where="--kind")
    answer = _agent(app, _config(ctx)).prepare(path, initiator, kind=dup_kind).to_dict()
    _emit(answer, as_json,
          f"session {answer['session_id']}: {answer['identifier']} "
          f"{answer['target_iqn']} lun {answer['lun']} at {','.join(answer['portals'])} "
          f"({answer['duplicate_kind']}, frozen {answer['freeze_window_ms']} ms)")


@agent.command()
@click.argument("session_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@pass_app
@click.pass_context
def status(ctx: click.Context, app: App, session_id: str | None, as_json: bool) -> None:
    """Show a session's state: healthy, invalid (snapshot overflow), expired...

    Without SESSION_ID: the thin bases kept for image backups (each volume's
    snapshot of its last committed image backup, which the next one's thin_delta
    starts from), and whether each is still trusted.

    \b
    Example:
      sanoffload agent status fs1-1a2b3c4d
      sanoffload agent status --json
    """
    if session_id is None:
        rows = _agent(app, _config(ctx)).base_rows()
        _emit({"bases": rows}, as_json, "\n".join(
            f"{printable(str(r['volume']))}  base {printable(str(r['base']))}  "
            f"{printable(str(r.get('backup', '-')))}  {r['state']}"
            + ("" if r["trusted"] else f"  NOT TRUSTED: {printable(str(r.get('why', '')))}")
            for r in rows) or "no thin bases")
        return
    st = _agent(app, _config(ctx)).status(session_id)
    _emit(st, as_json, f"{session_id}: {st['status']}")


@agent.command()
@click.argument("session_id")
@pass_app
@click.pass_context
def release(ctx: click.Context, app: App, session_id: str) -> None:
    """Unexport and drop (or merge back) a session's duplicate. Idempotent.

    \b
    Example:
      sanoffload agent release fs1-1a2b3c4d
    """
    done = _agent(app, _config(ctx)).release(session_id)
    click.echo(f"{session_id}: released ({len(done)} object(s) removed)")


@agent.command()
@click.option("--json", "as_json", is_flag=True)
@pass_app
@click.pass_context
def sessions(ctx: click.Context, app: App, as_json: bool) -> None:
    """List the agent's sessions.

    \b
    Example:
      sanoffload agent sessions --json
    """
    rows = _agent(app, _config(ctx)).sessions()
    _emit(rows, as_json, "\n".join(f"{r['session_id']}  {r['status']}  "
                                   f"{printable(str(r.get('path', r.get('record', ''))))}"
                                   for r in rows) or "no sessions")
    bad = [str(r["record"]) for r in rows if r["status"] == "unreadable"]
    if bad:
        # listed, and said in the exit code too: a monitor must notice
        raise JournalError(f"{len(bad)} journal record(s) unreadable: {', '.join(bad)}",
                           paths=bad, hint="sanoffload agent status SESSION says why")


@agent.command()
@click.option("--all", "all_sessions", is_flag=True,
              help="Release every session, ready ones too (what boot-time cleanup does).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
@click.pass_context
def cleanup(ctx: click.Context, app: App, all_sessions: bool, as_json: bool) -> None:
    """Remove what a crash or reboot left: failed/expired sessions and marked orphans.

    \b
    Example:
      sanoffload agent cleanup --all     # at boot (sanoffload-cleanup.service)
    """
    report = _agent(app, _config(ctx)).cleanup(all_sessions=all_sessions)
    _emit(report, as_json, f"released {len(report['released'])} session(s), removed "
                           f"{len(report['orphans_removed'])} orphan(s)"
                           + "".join(f"\n{printable(b)}" for b in report.get("bases", [])))


@agent.command()
@click.option("--stdio", is_flag=True, required=True,
              help="Speak the control protocol on stdin/stdout (the only transport).")
@click.option("--client", "client", required=True,
              help="The client (a [clients.NAME] of the config) this connection belongs to.")
@pass_app
@click.pass_context
def serve(ctx: click.Context, app: App, stdio: bool, client: str) -> None:
    """Serve one proxy connection; run by sshd from a forced command.

    The client name comes from the key's forced command, never from the
    proxy: it decides which initiators, roots and sessions the proxy may use.
    Sessions the connection leaves open are released when it ends.

    \b
    Example (root's authorized_keys on the first server, one line):
      command="sanoffload agent serve --stdio --client px1",restrict ssh-ed25519 AAAA… root@px1
    """
    from ..channel.server import refuse, serve as serve_channel, stdio_channel
    from ..errors import SanoffloadError
    from .service import AgentService

    channel = stdio_channel(peer=f"client {client}")
    try:
        service = AgentService(_agent(app, _config(ctx)), client)
    except SanoffloadError as exc:  # the proxy hears why, not just a closed connection
        ctx.exit(refuse(channel, exc))
    ctx.exit(serve_channel(service, channel))
