"""Who uses a disk on this host: mounts, swap, stacked devices, QEMU processes.

Asked before a restore writes an existing file or block device. Everything comes
from the kernel (``/proc``, ``/sys``), not from libvirt, so the answer holds
when libvirtd is down. An :class:`Identity` names a file or device the way the
kernel does (device number, or filesystem and inode), so a path reached through
another name (a by-id link, ``/dev/fd/N``, a bind mount) is the same disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from libvirt_rdm_backup.redact import printable

PROC = "/proc"
SYS_DEV_BLOCK = "/sys/dev/block"
SYS_BLOCK = "/sys/block"
_QEMU_PROGRAMS = ("qemu-system-", "qemu-storage-daemon", "qemu-nbd", "qemu-kvm")
_MAX_LINE = 64 * 1024  # the longest /proc line read, and the longest name shown


@dataclass(frozen=True)
class Identity:
    """A block device (``kind='b'``, its device number) or a file (``'f'``, dev and inode)."""

    kind: str
    number: int
    inode: int = 0

    @classmethod
    def of(cls, st: os.stat_result) -> Identity | None:
        """The identity of what ``st`` describes; None for anything but a file or device."""
        if stat.S_ISBLK(st.st_mode):
            return cls("b", st.st_rdev)
        if stat.S_ISREG(st.st_mode):
            return cls("f", st.st_dev, st.st_ino)
        return None

    @property
    def major_minor(self) -> str:
        """``MAJ:MIN`` of a block device, as sysfs and mountinfo spell it."""
        return f"{os.major(self.number)}:{os.minor(self.number)}"


def identity_of_path(path: str) -> Identity | None:
    """The identity of ``path`` (links followed); None when it is gone or neither kind."""
    try:
        return Identity.of(os.stat(path))
    except OSError:
        return None


def partitions(device: Identity) -> list[Identity]:
    """The partitions of a whole block device (from sysfs)."""
    base = os.path.join(SYS_DEV_BLOCK, device.major_minor)
    found = []
    try:
        names = os.listdir(base)
    except OSError:
        return []
    for name in names:
        number = _read_dev(os.path.join(base, name))
        if number is not None and os.path.exists(os.path.join(base, name, "partition")):
            found.append(Identity("b", number))
    return found


def _read_dev(directory: str) -> int | None:
    """The device number in ``directory/dev`` (``MAJ:MIN``), or None."""
    try:
        with open(os.path.join(directory, "dev"), encoding="ascii") as stream:
            major, minor = stream.read(64).strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def loops_over(target: Identity) -> list[Identity]:
    """Loop devices whose backing file or device is ``target`` or one of its partitions,
    and those over them in turn.

    A write to ``target`` changes what they show, so their users are ``target``'s too.
    """
    found: list[Identity] = []
    wanted = {target, *(partitions(target) if target.kind == "b" else [])}
    while True:
        more = [loop for loop, backing in _loop_backings() if backing in wanted
                and loop not in found and loop != target]
        if not more:
            return found
        found += more
        wanted |= set(more)


def _loop_backings() -> list[tuple[Identity, Identity]]:
    """``(loop device, what backs it)`` for every bound loop device, from sysfs."""
    pairs = []
    try:
        names = [n for n in os.listdir(SYS_BLOCK) if n.startswith("loop")]
    except OSError:
        return []
    for name in names:
        number = _read_dev(os.path.join(SYS_BLOCK, name))
        try:
            with open(os.path.join(SYS_BLOCK, name, "loop", "backing_file"),
                      encoding="utf-8", errors="surrogateescape") as stream:
                backing = stream.read(4097).rstrip("\n")
        except OSError:
            continue  # not bound
        ident = identity_of_path(backing) if backing.startswith("/") else None
        if number is not None and ident is not None:
            pairs.append((Identity("b", number), ident))
    return pairs


def holders(device: Identity) -> list[str]:
    """Why ``device`` (or one of its partitions) is in use by the kernel, one phrase each.

    Mounted filesystems, active swap, and devices stacked on it (md, dm, LVM).
    """
    found: list[str] = []
    devices = [device, *partitions(device)]
    numbers = {d.number for d in devices}
    found += [f"mounted at {where}" for where in _mount_points(numbers)]
    found += [f"active swap {name}" for name in _swaps(numbers)]
    for dev in devices:
        base = os.path.join(SYS_DEV_BLOCK, dev.major_minor, "holders")
        try:
            names = sorted(os.listdir(base))
        except OSError:
            names = []
        found += [f"held by {_printable(n)} (md, dm or LVM)" for n in names]
    return found


def _mount_points(numbers: set[int]) -> list[str]:
    """Mount points of filesystems on any of the block devices ``numbers``."""
    points = []
    for fields in _lines(os.path.join(PROC, "self", "mountinfo")):
        parts = fields.split(" ")
        if len(parts) < 5:
            continue
        try:
            major, minor = parts[2].split(":")
            number = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        if number in numbers:
            points.append(_printable(_unescape(parts[4])))
    return points


def _swaps(numbers: set[int]) -> list[str]:
    """Active swap areas that are one of the block devices ``numbers``."""
    names = []
    for line in list(_lines(os.path.join(PROC, "swaps")))[1:]:
        name = _unescape(line.split()[0]) if line.split() else ""
        ident = identity_of_path(name) if name else None
        if ident is not None and ident.kind == "b" and ident.number in numbers:
            names.append(_printable(name))
    return names


def qemu_users(identities: Iterable[Identity]) -> list[str]:
    """QEMU processes on this host that hold any of ``identities`` open, one phrase each.

    Every QEMU program (system emulators, storage daemon, qemu-nbd) is asked
    through ``/proc/PID/fd``, so a disk a guest uses is found without libvirt.
    """
    wanted = set(identities)
    found = []
    for pid in _pids():
        program = _qemu_program(pid)
        if pid == os.getpid() or program is None:
            continue
        if any(ident in wanted for ident in _open_identities(pid)):
            guest = _guest_name(pid)
            found.append(f"running domain {guest} (QEMU process {pid})" if guest
                         else f"{program} process {pid}")
    return found


def _pids() -> Iterator[int]:
    try:
        names = os.listdir(PROC)
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def _qemu_program(pid: int) -> str | None:
    """The name of the QEMU program process ``pid`` runs, or None for any other program."""
    try:
        exe = os.path.basename(os.readlink(os.path.join(PROC, str(pid), "exe")))
    except OSError:
        return None
    exe = exe.removesuffix(" (deleted)")
    return _printable(exe) if exe.startswith(_QEMU_PROGRAMS) else None


def _open_identities(pid: int) -> Iterator[Identity]:
    fds = os.path.join(PROC, str(pid), "fd")
    try:
        names = os.listdir(fds)
    except OSError:
        return
    for name in names:
        try:
            ident = Identity.of(os.stat(os.path.join(fds, name)))
        except OSError:
            continue
        if ident is not None:
            yield ident


def _guest_name(pid: int) -> str:
    """``NAME`` from a QEMU command line's ``-name guest=NAME``, else empty."""
    try:
        with open(os.path.join(PROC, str(pid), "cmdline"), "rb") as stream:
            argv = stream.read(_MAX_LINE).split(b"\0")
    except OSError:
        return ""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == b"-name":
            first = value.decode("utf-8", "replace").split(",")[0]
            return _printable(first.removeprefix("guest="))
    return ""


def _lines(path: str) -> Iterator[str]:
    """Lines of a small kernel table, each cut to a bounded length."""
    try:
        with open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                yield line[:_MAX_LINE].rstrip("\n")
    except OSError:
        return


def _unescape(field: str) -> str:
    """Undo the octal escapes (``\\040`` for a space) of mountinfo and swaps."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _printable(text: str) -> str:
    """``text`` safe for one line of output (control characters escaped, bounded)."""
    shown = printable(text[:256]).replace("\n", "\\n").replace("\t", "\\t")
    return shown + ("..." if len(text) > 256 else "")
