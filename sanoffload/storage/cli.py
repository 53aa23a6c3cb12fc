"""``sanoffload storage ...``: the storage node's commands (SAN mode)."""

from __future__ import annotations

import json

import click

from ..cli import App, pass_app
from . import config as storage_config
from .node import StorageNode


def _node(app: App, config_path: str) -> StorageNode:
    return StorageNode(app.get_runner(), storage_config.load(config_path))


def _config(ctx: click.Context) -> str:
    return str(ctx.meta.get("storage_config", storage_config.DEFAULT_PATH))


@click.group("storage")
@click.option("--config", "config_path", default=storage_config.DEFAULT_PATH,
              show_default=True, help="The storage node's configuration file.")
@click.pass_context
def storage(ctx: click.Context, config_path: str) -> None:
    """Storage node: duplicate LUNs for first servers, expose them to their proxies.

    \b
    Example:
      sanoffload storage cleanup --all
    """
    ctx.meta["storage_config"] = config_path


@storage.command()
@click.option("--stdio", is_flag=True, required=True,
              help="Speak the control protocol on stdin/stdout (the only transport).")
@click.option("--client", "client", required=True,
              help="The first server (a [clients.NAME] of the config) this connection is.")
@pass_app
@click.pass_context
def serve(ctx: click.Context, app: App, stdio: bool, client: str) -> None:
    """Serve one first server's connection; run by sshd from a forced command.

    The client name comes from the key's forced command, never from the
    request: it decides which LUNs the first server may duplicate and which
    proxies their duplicates may be exposed to. What the connection leaves
    is released when it ends (after grace_s).

    \b
    Example (root's authorized_keys on the storage node, one line):
      command="sanoffload storage serve --stdio --client fs1",restrict ssh-ed25519 AAAA… root@fs1
    """
    from ..channel.server import refuse, serve as serve_channel, stdio_channel
    from ..errors import SanoffloadError
    from .service import StorageService

    channel = stdio_channel(peer=f"client {client}")
    try:
        service = StorageService(_node(app, _config(ctx)), client)
    except SanoffloadError as exc:  # the first server hears why, not just a closed connection
        ctx.exit(refuse(channel, exc))
    ctx.exit(serve_channel(service, channel))


@storage.command()
@click.option("--all", "all_sessions", is_flag=True,
              help="Release every duplicate, held ones too (what boot-time cleanup does).")
@click.option("--json", "as_json", is_flag=True)
@pass_app
@click.pass_context
def cleanup(ctx: click.Context, app: App, all_sessions: bool, as_json: bool) -> None:
    """Remove what ended connections and crashes left: duplicates no live connection
    holds, failed and expired ones, and marked objects no journal record names.

    \b
    Example:
      sanoffload storage cleanup --all     # at boot
    """
    report = _node(app, _config(ctx)).cleanup(all_sessions=all_sessions)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(f"released {len(report['released'])} duplicate(s), removed "
                   f"{len(report['orphans_removed'])} orphan(s)")
