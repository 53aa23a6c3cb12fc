"""The backup server's configuration: ``/etc/sanoffload/store.toml``.

Names each client's repository and quota; the forced command's ``--client``
selects one, so a proxy's key reaches its own repository and no other::

    [clients.px1]
    repo = "/srv/backups"      # required: an existing directory
    quota_gb = 500             # optional: refuse puts once this many GiB are stored
    hosts = ["fs1", "fs2"]     # optional: the source hosts this client may store/read

Without the file, ``store serve --repo DIR --client NAME`` serves DIR with no
quota. Every problem is a ConfigError naming the file and the key; unknown
keys are refused. A client's name is recorded in the manifests of the backups
it puts (what its quota is charged for), so it is checked like one: letters,
digits, ``_.-``, at most 64.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from ..configfile import NAME_RULE, parse_toml, read_text, valid_name
from ..errors import AuthError, ConfigError
from .repo import check_host

DEFAULT_PATH = "/etc/sanoffload/store.toml"
_CLIENT_KEYS = {"repo", "quota_gb", "hosts"}


@dataclass(frozen=True)
class StoreClient:
    name: str
    repo: str
    quota_bytes: int | None = None
    hosts: tuple[str, ...] | None = None


def check_client(name: object) -> str:
    """A client's name as the forced command gives it; AuthError if it cannot be one."""
    if not valid_name(name):
        raise AuthError(f"invalid client name {name!r}: use {NAME_RULE}")
    assert isinstance(name, str)
    return name


def parse(text: str, source: str) -> dict[str, StoreClient]:
    data = parse_toml(text, source)
    unknown = set(data) - {"clients"}
    if unknown:
        raise ConfigError(f"{source}: {sorted(unknown)[0]}: unknown key (known: clients)")
    clients = data.get("clients")
    if not isinstance(clients, dict) or not clients:
        raise ConfigError(f"{source}: clients: no [clients.NAME] table")
    out: dict[str, StoreClient] = {}
    for name, body in clients.items():
        key = f"clients.{name}"
        if not valid_name(name):
            raise ConfigError(f"{source}: {key}: client names are {NAME_RULE}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: {key}: must be a table")
        for k in body:
            if k not in _CLIENT_KEYS:
                raise ConfigError(f"{source}: {key}.{k}: unknown key "
                                  f"(known: {', '.join(sorted(_CLIENT_KEYS))})")
        repo = body.get("repo")
        if not isinstance(repo, str) or not os.path.isabs(repo) or ".." in repo.split("/"):
            raise ConfigError(f"{source}: {key}.repo: required, an absolute path without '..'")
        quota = body.get("quota_gb")
        quota_bytes = None
        if quota is not None:
            if (isinstance(quota, bool) or not isinstance(quota, (int, float)) or quota <= 0
                    or not math.isfinite(quota)):
                raise ConfigError(f"{source}: {key}.quota_gb: must be a number > 0")
            quota_bytes = int(quota * (1 << 30))
        hosts: Any = body.get("hosts")
        if hosts is not None:
            if not isinstance(hosts, list):
                raise ConfigError(f"{source}: {key}.hosts: must be a list of host names")
            try:
                hosts = tuple(check_host(h) for h in hosts)
            except Exception as exc:
                raise ConfigError(f"{source}: {key}.hosts: {exc}") from None
        out[name] = StoreClient(name, os.path.normpath(repo), quota_bytes, hosts)
    return out


def client_for(name: str, *, path: str = DEFAULT_PATH, repo: str | None = None) -> StoreClient:
    """The client ``name``: from the config file if there is one, else ``repo`` unrestricted."""
    check_client(name)
    text = read_text(path)
    if text is None:
        if repo is None:
            raise ConfigError(f"{path}: no such file, and no --repo given")
        return StoreClient(name, repo)
    clients = parse(text, path)
    client = clients.get(name)
    if client is None:
        raise AuthError(f"client {name!r} is not in {path}", hint=f"add a [clients.{name}] table")
    if repo is not None and os.path.normpath(repo) != client.repo:
        raise AuthError(f"client {name!r} may use {client.repo}, not {repo}")
    return client
