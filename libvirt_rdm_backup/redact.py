"""What is shown of a message: no password of a URI (``qemu+tcp://user:secret@host/`` reads
``user:***@host``) and no control character a terminal or a log reader would act on."""

from __future__ import annotations

import re
from typing import Any

# scheme://user:password@ — the password runs to the authority's last '@'
_USERINFO_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*):[^/?#\s]*@")
# libiscsi's form: iscsi://user%password@host/...
_ISCSI_RE = re.compile(r"(iscsi://[^/?#@\s%]*)%[^/?#\s]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` (and libiscsi's
    ``iscsi://user%password@``) replaced by ``***``."""
    return _ISCSI_RE.sub(r"\1%***@", _USERINFO_RE.sub(r"\1:***@", text))


def carries_secret(command: str, arguments: dict[str, Any] | None) -> bool:
    """True for a QMP command that hands QEMU a secret's value (``object-add`` with ``data``)."""
    return command == "object-add" and isinstance(arguments, dict) and "data" in arguments


def qmp_arguments(command: str, arguments: dict[str, Any] | None) -> Any:
    """QMP arguments as a log may show them: the ``data`` of a ``secret`` object replaced."""
    if arguments is not None and carries_secret(command, arguments):
        return {**arguments, "data": "***"}
    return arguments or ""


# C0 and C1 controls but newline and tab, and the Unicode controls that reorder or end lines
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """``text`` with every control character (ESC, BEL, bidi overrides ...) but newline and
    tab written as an escape (``\\x1b``): names read back from a repository, a volume or an
    agent reach terminals and logs as they are, never as commands to them."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                           else f"\\u{ord(m.group()):04x}", text)
