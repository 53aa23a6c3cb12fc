"""iSCSI qualified names (RFC 3720 3.2.6.3.1, lowercase per RFC 3722): one check for all."""

from __future__ import annotations

import re

IQN_RE = re.compile(
    r"^iqn\.(?P<year>\d{4})-(?P<month>\d{2})\."
    r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*"
    r"(?::[a-z0-9.:-]+)?$")
IQN_MAX_LEN = 223


def valid_iqn(name: str) -> bool:
    """``iqn.YYYY-MM.reversed.domain[:unique]``, a real month, at most 223 bytes."""
    match = IQN_RE.match(name)
    return match is not None and 1 <= int(match.group("month")) <= 12 and len(name) <= IQN_MAX_LEN
