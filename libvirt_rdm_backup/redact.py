"""Passwords in URIs are never shown: ``qemu+tcp://user:secret@host/`` reads ``user:***@host``."""

from __future__ import annotations

import re

# scheme://user:password@ — the password runs to the authority's last '@'
_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*):[^/?#\s]*@")
# libiscsi's form: iscsi://user%password@host/...
_ISCSI_RE = re.compile(r"(iscsi://[^/?#@\s%]*)%[^/?#\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` (and libiscsi's
    ``iscsi://user%password@``) replaced by ``***``."""
    return _ISCSI_RE.sub(r"\1%***@", _USERINFO_RE.sub(r"\1:***@", text))
