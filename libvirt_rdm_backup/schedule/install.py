"""Install and remove a scheduled ``backup --all``: the units, the environment file, the timer.

The units go into ``/etc/systemd/system`` (or ``unit_dir``), the environment file of instance
NAME is ``/etc/libvirt-rdm-backup/NAME.env`` (or in ``config_dir``), mode 0600: its options may
one day hold what no one else should read. ``systemctl`` is run only where systemd is the init
system (``/run/systemd/system`` exists, as ``sd_booted()`` checks); elsewhere the commands to
run are returned instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any

from libvirt_rdm_backup.errors import NotFoundError, OperationError, UsageError
from libvirt_rdm_backup.fileutil import write_atomic
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.schedule.texts import (
    PACKAGED_COMMAND,
    PACKAGED_CONFIG_DIR,
    SERVICE,
    TIMER,
    check_instance,
    check_unit_path,
    env_file,
    packaged,
    service_unit,
    timer_dropin,
)

UNIT_DIR = "/etc/systemd/system"
CONFIG_DIR = PACKAGED_CONFIG_DIR
SYSTEMD_RUNTIME = "/run/systemd/system"
DROPIN = "schedule.conf"


@dataclass
class Change:
    """What ``schedule install`` or ``uninstall`` did, and what is left to run by hand."""

    name: str
    action: str
    timer: str
    files: list[str] = field(default_factory=list)
    enabled: bool = False
    commands: list[list[str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``schedule --json`` document."""
        return {"name": self.name, "action": self.action, "timer": self.timer,
                "files": self.files, "systemctl_done": self.enabled,
                "commands": [" ".join(c) for c in self.commands]}


def systemd_running() -> bool:
    """True when systemd is the init system of this host."""
    return os.path.isdir(SYSTEMD_RUNTIME)


def rdm_backup_command() -> str:
    """The ``rdm-backup`` command beside this Python (a venv), else on PATH, else the
    packaged ``/usr/local/bin/rdm-backup``."""
    beside = os.path.join(os.path.dirname(sys.executable), "rdm-backup")
    for found in (beside if os.access(beside, os.X_OK) else None, shutil.which("rdm-backup")):
        if found is None:
            continue
        try:
            return check_unit_path(os.path.abspath(found), "command")
        except UsageError:  # a path a unit cannot hold as it is
            continue
    return PACKAGED_COMMAND


def _systemctl(change: Change, commands: list[list[str]], enable: bool) -> None:
    """Run ``commands`` where systemd runs (and ``enable``), else leave them to the admin."""
    if enable and systemd_running():
        for argv in commands:
            run(argv, timeout=120)
        change.enabled = True
    else:
        change.commands = commands


def install(name: str, target: str, options: list[str], on_calendar: str | None = None,
            unit_dir: str = UNIT_DIR, config_dir: str = CONFIG_DIR,
            enable: bool = True) -> Change:
    """Write the units, the instance's environment file and timer drop-in; enable the timer.

    ``options`` must already be checked (the CLI parses them with the ``backup`` parser).
    """
    check_instance(name)
    check_unit_path(config_dir, "--config-dir")
    timer = f"rdm-backup@{name}.timer"
    change = Change(name, "install", timer)
    env_text = env_file(target, options)  # every text is made (and checked) before any write
    units = ((SERVICE, service_unit(rdm_backup_command(), config_dir)), (TIMER, packaged(TIMER)))
    try:
        os.makedirs(config_dir, mode=0o700, exist_ok=True)
        env_path = os.path.join(config_dir, f"{name}.env")
        write_atomic(env_path, env_text.encode(), mode=0o600)
        os.makedirs(unit_dir, mode=0o755, exist_ok=True)
        for unit, text in units:
            write_atomic(os.path.join(unit_dir, unit), text.encode(), mode=0o644)
            change.files.append(os.path.join(unit_dir, unit))
        dropin_dir = os.path.join(unit_dir, f"{timer}.d")
        dropin = os.path.join(dropin_dir, DROPIN)
        if on_calendar is not None:
            os.makedirs(dropin_dir, mode=0o755, exist_ok=True)
            write_atomic(dropin, timer_dropin(on_calendar).encode(), mode=0o644)
            change.files.append(dropin)
        else:
            _remove(dropin, dropin_dir)
        change.files.append(env_path)
    except OSError as err:
        raise OperationError(f"schedule: cannot install {timer}: {err}") from err
    _systemctl(change, [["systemctl", "daemon-reload"],
                        ["systemctl", "enable", "--now", timer]], enable)
    return change


def _remove(path: str, directory: str | None = None) -> bool:
    """Remove ``path`` (and ``directory`` when it is empty then); True if it was there."""
    try:
        os.unlink(path)
        removed = True
    except FileNotFoundError:
        removed = False
    if directory is not None:
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return removed


def uninstall(name: str, unit_dir: str = UNIT_DIR, config_dir: str = CONFIG_DIR,
              enable: bool = True) -> Change:
    """Stop and disable the instance's timer, remove its files, and the units when no other
    instance is left (NotFoundError when the instance is not installed)."""
    check_instance(name)
    timer = f"rdm-backup@{name}.timer"
    change = Change(name, "uninstall", timer)
    env_path = os.path.join(config_dir, f"{name}.env")
    dropin_dir = os.path.join(unit_dir, f"{timer}.d")
    if not (os.path.lexists(env_path) or os.path.lexists(dropin_dir)):
        raise NotFoundError(f"schedule: no {timer} is installed ({env_path} does not exist)")
    _systemctl(change, [["systemctl", "disable", "--now", timer]], enable)
    try:
        for path, directory in ((env_path, None), (os.path.join(dropin_dir, DROPIN), dropin_dir)):
            if _remove(path, directory):
                change.files.append(path)
        others = [e for e in os.listdir(config_dir) if e.endswith(".env")] if os.path.isdir(
            config_dir) else []
        if not others:
            for unit in (SERVICE, TIMER):
                if _remove(os.path.join(unit_dir, unit)):
                    change.files.append(os.path.join(unit_dir, unit))
    except OSError as err:
        raise OperationError(f"schedule: cannot remove {timer}: {err}") from err
    reload = Change(name, "uninstall", timer)
    _systemctl(reload, [["systemctl", "daemon-reload"]], enable)
    change.commands += reload.commands
    return change
