"""The libvirt QEMU hook: records domain lifecycle events (:mod:`libvirt_rdm_backup.events`).

libvirtd runs every executable in ``/etc/libvirt/hooks/qemu.d/`` (after
``/etc/libvirt/hooks/qemu``) synchronously, as root, with the arguments
``<domain name> <operation> <sub-operation> <extra>`` and the domain XML on stdin. For the
``migrate`` and ``restore`` operations its stdout is taken as a replacement for that XML (empty
output: unchanged), and a non-zero exit blocks the operation. So the hook:

* never calls libvirt (libvirtd waits for it: that would deadlock);
* prints nothing on stdout, always exits 0 and is quick;
* treats its arguments and stdin as untrusted: the UUID comes from the XML, read with a
  size cap and a parser without DTDs, entities or network, and must be a valid UUID.

libvirtd looks for hook scripts only when it starts (or reloads on SIGHUP, see
:func:`install`).
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import sys
from collections.abc import Sequence
from typing import IO

from lxml import etree

from libvirt_rdm_backup import events
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.fileutil import fsync_dir, write_atomic

HOOKS_DIR = "/etc/libvirt/hooks"
HOOK_NAME = "50-libvirt-rdm-backup"
MARKER = "# managed-by: libvirt-rdm-backup hook"
#: Where the QEMU driver of a privileged libvirtd keeps ``<name>.pid`` of running domains.
QEMU_RUN_DIR = "/run/libvirt/qemu"
MAX_XML_BYTES = 4 * 1024 * 1024
_DRAIN_LIMIT = 256 * 1024 * 1024

#: (operation, sub-operation or None for any) -> event kind.
EVENT_OF: dict[tuple[str, str | None], str] = {
    ("started", "begin"): "started",
    ("stopped", "end"): "stopped",
    ("migrate", None): "migrated",
    ("restore", None): "restored",
    ("reconnect", None): "reconnected",
}
#: Events for which QEMU's pid is recorded (its pid file names the process concerned).
_PID_EVENTS = ("started", "stopped", "reconnected")
_NAME_RE = re.compile(r"^[^/\x00-\x1f\x7f]{1,255}$")


def event_for(operation: str, sub: str) -> str | None:
    """The event kind recorded for a hook call, or None when it is ignored."""
    return EVENT_OF.get((operation, sub)) or EVENT_OF.get((operation, None))


def _say(message: str) -> None:
    """One short line on stderr; never raises."""
    try:
        sys.stderr.write(f"libvirt-rdm-backup hook: {' '.join(message.split())[:300]}\n")
        sys.stderr.flush()
    except Exception:  # stderr may be closed; nothing left to report to
        pass


def _read_input(stdin: IO[str] | IO[bytes]) -> bytes | None:
    """Up to MAX_XML_BYTES of stdin, the rest drained; None when it was larger."""
    stream = getattr(stdin, "buffer", stdin)
    data = stream.read(MAX_XML_BYTES + 1)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    if len(data) <= MAX_XML_BYTES:
        return bytes(data)
    drained = len(data)
    while drained < _DRAIN_LIMIT:  # let the writer finish; libvirtd may not like EPIPE
        chunk = stream.read(1024 * 1024)
        if not chunk:
            break
        drained += len(chunk)
    return None


def _drain(stdin: IO[str] | IO[bytes]) -> None:
    try:
        _read_input(stdin)
    except Exception:  # stdin may be closed or absent
        pass


def uuid_from_xml(data: bytes) -> str:
    """The canonical ``<domain><uuid>`` of domain XML (raises UsageError when absent/invalid)."""
    if len(data) > MAX_XML_BYTES:
        raise UsageError("domain XML is too large")
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise UsageError("domain XML with a DTD or entities is refused")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, huge_tree=False, load_dtd=False,
        dtd_validation=False, collect_ids=False,
    )
    try:
        root = etree.fromstring(data, parser)
    except (etree.XMLSyntaxError, ValueError) as err:
        raise UsageError(f"malformed domain XML: {err}") from err
    if root.tag != "domain":
        raise UsageError(f"not a domain XML document (root element {str(root.tag)[:40]!r})")
    found = root.find("uuid")
    if found is None or not found.text:
        raise UsageError("domain XML without <uuid>")
    return events.check_uuid(found.text)


def qemu_pid(name: str, run_dir: str = QEMU_RUN_DIR) -> int | None:
    """QEMU's pid from libvirt's pid file of domain ``name``, or None (never raises)."""
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        return None
    try:
        fd = os.open(
            os.path.join(run_dir, name + ".pid"),
            os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
        )
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        text = os.read(fd, 32)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if 0 < pid < 2**22 else None


def main(
    argv: Sequence[str],
    stdin: IO[str] | IO[bytes],
    *,
    state_dir: str | None = None,
    run_dir: str = QEMU_RUN_DIR,
) -> int:
    """Handle one hook call: record the event it means, if any. Always returns 0, never raises."""
    try:
        if len(argv) < 3:
            _drain(stdin)
            _say("expected arguments: <domain> <operation> <sub-operation> [<extra>]")
            return 0
        name, operation, sub = str(argv[0]), str(argv[1]), str(argv[2])
        kind = event_for(operation, sub)
        if kind is None:
            _drain(stdin)
            return 0
        data = _read_input(stdin)
        if data is None:
            _say(f"{operation}/{sub}: domain XML larger than {MAX_XML_BYTES} bytes, ignored")
            return 0
        domain_uuid = uuid_from_xml(data)
        pid = qemu_pid(name, run_dir) if kind in _PID_EVENTS else None
        events.record_event(domain_uuid, kind, operation, sub, state_dir, pid=pid)
    except BaseException as err:  # a hook must never fail a domain operation
        _say(f"{type(err).__name__}: {err}")
    return 0


# -- installation ------------------------------------------------------------------------------


def hook_path(hooks_dir: str = HOOKS_DIR) -> str:
    """Path of the installed hook script."""
    return os.path.join(hooks_dir, "qemu.d", HOOK_NAME)


def hook_script(python: str, state_dir: str | None = None) -> str:
    """The text of the hook script.

    Not a bare ``exec``: when Python or the package is gone or broken, the script still exits
    0 so that libvirtd starts the domain anyway. Operations that are not recorded return
    without starting Python; stdout goes to /dev/null (libvirtd reads it for migrate/restore).
    """
    if not os.path.isabs(python):
        raise UsageError(f"the hook needs an absolute path to Python, not {python!r}")
    if state_dir is not None and not os.path.isabs(state_dir):
        raise UsageError(f"the hook needs an absolute state directory, not {state_dir!r}")
    ops = "|".join(sorted({op for op, _ in EVENT_OF}))
    env = ""
    if state_dir is not None:
        env = f"{events.STATE_DIR_ENV}={shlex.quote(state_dir)}\nexport {events.STATE_DIR_ENV}\n"
    py = shlex.quote(python)
    return (
        "#!/bin/sh\n"
        f"{MARKER}\n"
        "# Records QEMU start/stop events of libvirt domains for incremental backups.\n"
        "# Must not call libvirt, must exit 0. Remove with libvirt_rdm_backup.hook.uninstall().\n"
        f"{env}"
        'case "$2" in\n'
        f"    {ops}) ;;\n"
        "    *) cat >/dev/null 2>&1; exit 0 ;;\n"
        "esac\n"
        f"if [ -x {py} ]; then\n"
        f'    {py} -I -m libvirt_rdm_backup.hook "$@" >/dev/null || :\n'
        "else\n"
        "    cat >/dev/null 2>&1\n"
        "fi\n"
        "exit 0\n"
    )


def install(
    hooks_dir: str = HOOKS_DIR, python: str = sys.executable, state_dir: str | None = None
) -> str:
    """Install (or replace) the hook script ``<hooks_dir>/qemu.d/50-libvirt-rdm-backup``.

    ``python`` must be an absolute path (a venv's ``bin/python`` is kept as is, not resolved);
    ``state_dir`` is baked into the script as ``$RDM_BACKUP_STATE_DIR``. The script is written
    next to ``qemu.d`` and renamed into it, complete and executable (mode 0755). Returns a
    message for the user: libvirtd must be restarted to see a first hook.
    """
    if state_dir is not None:
        state_dir = os.path.abspath(state_dir)
    text = hook_script(python, state_dir)
    target = hook_path(hooks_dir)
    directory = os.path.dirname(target)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    # Not inside qemu.d: libvirtd runs every executable there, a temporary file included.
    write_atomic(target, text.encode("utf-8"), 0o755, tmp_dir=hooks_dir)
    return (
        f"installed the libvirt hook {target}; libvirtd looks for hooks only when it starts: "
        "restart libvirtd (or send it SIGHUP) before relying on it"
    )


def uninstall(hooks_dir: str = HOOKS_DIR) -> bool:
    """Remove our hook script; False when it was not installed.

    Raises UsageError when a file of that name exists that this package did not write.
    """
    path = hook_path(hooks_dir)
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            head = stream.read(4096)
    except FileNotFoundError:
        return False
    if MARKER not in head:
        raise UsageError(f"{path} was not installed by libvirt-rdm-backup; not removing it")
    os.unlink(path)
    fsync_dir(os.path.dirname(path))
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], sys.stdin))
