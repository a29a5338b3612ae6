"""Names of every QEMU object the tool creates: one prefix, so leftovers can be found."""

from __future__ import annotations

import secrets

PREFIX = "rdmb"


def object_name(kind: str, disk: str, token: str | None = None) -> str:
    """``rdmb-<kind>-<disk>-<token>``: a node, job or bitmap name of this tool."""
    return f"{PREFIX}-{kind}-{disk}-{token or secrets.token_hex(3)}"


def is_ours(name: str) -> bool:
    """True for names created by this tool."""
    return name.startswith(PREFIX + "-")
