"""What ``schedule install`` writes: the packaged units made concrete, the environment file of
an instance, the timer's drop-in; and the checks of every value that goes into them."""

from __future__ import annotations

import re
import shutil
from importlib import resources

from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.process import run

SERVICE = "rdm-backup@.service"
TIMER = "rdm-backup@.timer"
PACKAGED_COMMAND = "/usr/local/bin/rdm-backup"
PACKAGED_CONFIG_DIR = "/etc/libvirt-rdm-backup"
# an instance name as systemd-escape leaves it, without its \xNN escapes, dots at the start
_INSTANCE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,99}")
# paths written into a unit: nothing systemd would expand, split or unquote
_UNIT_PATH_RE = re.compile(r"/[A-Za-z0-9_./+:@-]*")
MAX_VALUE = 4096


def check_instance(name: str) -> str:
    """A timer instance name (``rdm-backup@NAME``): letters, digits, ``_ . : -`` and no
    ``..``, ``/``, whitespace or escapes, at most 100 characters (raises UsageError)."""
    if not _INSTANCE_RE.fullmatch(name) or ".." in name:
        raise UsageError(f"schedule: malformed name {name[:100]!r}: use letters, digits and "
                         "_ . : - (no /, .., whitespace; at most 100 characters)")
    return name


def check_unit_path(path: str, what: str) -> str:
    """An absolute path that a unit file can hold as it is (raises UsageError)."""
    if not _UNIT_PATH_RE.fullmatch(path) or "/../" in path + "/":
        raise UsageError(f"schedule: {what} {path[:200]!r} is not a plain absolute path")
    return path


def check_calendar(spec: str) -> str:
    """A systemd calendar expression (checked by ``systemd-analyze calendar`` where it is
    installed; raises UsageError)."""
    if not spec or len(spec) > 200 or not spec.isprintable() or "%" in spec or "\\" in spec:
        raise UsageError(f"schedule: malformed --on-calendar {spec[:200]!r}")
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        try:
            run([analyze, "calendar", spec], timeout=30)
        except RdmBackupError as err:
            raise UsageError(f"schedule: --on-calendar {spec!r} is not a systemd calendar "
                             f"expression: {err}") from err
    return spec


def _quoted(value: str) -> str:
    """``value`` double-quoted as a systemd environment file reads it back unchanged."""
    if len(value) > MAX_VALUE or not value.isprintable():
        raise UsageError(f"schedule: value {value[:100]!r} cannot go into an environment file")
    return '"' + re.sub(r'(["\\`$])', r"\\\1", value) + '"'


def env_file(target: str, options: list[str]) -> str:
    """The instance's environment file: the target (one word whatever it holds) and the
    options (split at whitespace by the unit, so no option may hold any)."""
    for word in options:
        if not word or any(c.isspace() for c in word):
            raise UsageError(f"schedule: option {word!r} holds whitespace, which the "
                             "unit cannot pass on; write it without")
    return ("# written by rdm-backup schedule install; options are checked there\n"
            f"RDM_BACKUP_TARGET={_quoted(target)}\n"
            f"RDM_BACKUP_OPTIONS={_quoted(' '.join(options))}\n")


def packaged(name: str) -> str:
    """The text of a unit shipped in the package."""
    return (resources.files("libvirt_rdm_backup.schedule") / "units" / name).read_text("utf-8")


def service_unit(command: str, config_dir: str) -> str:
    """The service template with this ``rdm-backup`` command and environment directory."""
    text = packaged(SERVICE)
    text = text.replace(f"ExecStart={PACKAGED_COMMAND} ", f"ExecStart={command} ")
    return text.replace(f"{PACKAGED_CONFIG_DIR}/%i.env", f"{config_dir}/%i.env")


def timer_dropin(on_calendar: str) -> str:
    """A drop-in of one timer instance that replaces the nightly schedule."""
    return f"[Timer]\nOnCalendar=\nOnCalendar={on_calendar}\n"
