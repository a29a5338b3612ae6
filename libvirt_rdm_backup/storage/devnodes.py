"""Reading the host's block device tree without opening a device.

Device numbers come from ``fstat`` of an ``O_PATH`` descriptor
(:func:`device_node`), attributes from sysfs files, device-mapper tables from
``dmsetup table`` (used by :mod:`sysfs`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.process import run


def dmsetup_table(name: str) -> str | None:
    """``dmsetup table NAME`` output, or None when dmsetup is missing or fails."""
    if shutil.which("dmsetup") is None:
        return None
    try:
        return run(["dmsetup", "table", name], timeout=30).stdout
    except OperationError:
        return None


def parse_dm_table(text: str) -> list[list[str]]:
    """Split ``dmsetup table`` output into per-segment word lists (blank lines dropped)."""
    return [line.split() for line in text.splitlines() if line.strip()]


def device_node(path: str) -> os.stat_result:
    """``fstat`` of ``path`` itself, opened with ``O_PATH | O_NOFOLLOW``.

    An ``O_PATH`` descriptor does not open the device (no driver is called, nothing
    can be read through it), a symlink is not followed, and the mode and device
    number come from the object the descriptor holds, not from a second lookup of
    the name. Raises OSError (ENOENT, ELOOP, ...).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def read_attr(path: Path) -> str | None:
    """Stripped content of a sysfs attribute, or None when missing or unreadable."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    value = read_attr(path)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def put(identity: dict[str, Any], key: str, value: Any) -> None:
    """Set ``identity[key]`` unless the value is missing or empty."""
    if value is not None and value != "" and value != []:
        identity[key] = value


def dm_kind(uuid: str, types: list[str]) -> str:
    """``dm-multipath``, ``dm-linear`` or plain ``dm`` from the uuid prefix and table."""
    if uuid.startswith("mpath-") or types == ["multipath"]:
        return "dm-multipath"
    if types == ["linear"]:
        return "dm-linear"
    return "dm"
