"""A typed view of the Linux SCSI target framework daemon (``tgtd``) through ``tgtadm``.

Only reading for now: :func:`show_targets` parses ``tgtadm --lld iscsi --op show
--mode target`` into :class:`TgtTarget` objects and :func:`find_lun` looks one LUN
up by IQN and LUN number. The parser, :func:`parse_show_target`, is a pure function.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from dataclasses import dataclass, field

from libvirt_rdm_backup.errors import CommandError, OperationError, StorageError
from libvirt_rdm_backup.process import run

TGTADM = "tgtadm"
DEFAULT_TIMEOUT = 30.0

_TARGET_RE = re.compile(r"^Target (\d+): (\S+)\s*$")
_LUN_RE = re.compile(r"^LUN: (\d+)\s*$")
_SIZE_RE = re.compile(r"^Size: (\d+) MB, Block size: (\d+)\s*$")
_INITIATOR_RE = re.compile(r"^Initiator: (\S+)")
_SECTIONS = {
    "System information:": "system",
    "I_T nexus information:": "nexus",
    "LUN information:": "lun",
    "Account information:": "account",
    "ACL information:": "acl",
}


@dataclass(frozen=True)
class TgtLun:
    """One logical unit of a tgt target.

    ``size_mb`` is what tgtadm prints: decimal megabytes (10**6 bytes), rounded
    down, so it is only a rough size; ask the LUN itself for the exact one.
    ``backing_store_path`` is None for LUN 0 (the controller) and other null stores.
    """

    lun: int
    type: str
    scsi_id: str
    scsi_sn: str
    size_mb: int
    block_size: int
    online: bool
    readonly: bool
    backing_store_type: str
    backing_store_path: str | None
    backing_store_flags: str = ""


@dataclass(frozen=True)
class TgtTarget:
    """One iSCSI target of tgtd: its LUNs, ACL entries and connected initiators."""

    tid: int
    iqn: str
    luns: tuple[TgtLun, ...] = ()
    acl: tuple[str, ...] = ()
    initiators: tuple[str, ...] = ()

    def lun(self, number: int) -> TgtLun | None:
        """The LUN with this number, or None."""
        return next((lun for lun in self.luns if lun.lun == number), None)


@dataclass
class _TargetBuilder:
    tid: int
    iqn: str
    luns: list[dict[str, str]] = field(default_factory=list)
    acl: list[str] = field(default_factory=list)
    initiators: list[str] = field(default_factory=list)

    def build(self) -> TgtTarget:
        return TgtTarget(
            tid=self.tid,
            iqn=self.iqn,
            luns=tuple(_lun_from_fields(f) for f in self.luns),
            acl=tuple(self.acl),
            initiators=tuple(self.initiators),
        )


def _yes(value: str | None) -> bool:
    return (value or "").strip().lower() == "yes"


def _lun_from_fields(fields: dict[str, str]) -> TgtLun:
    path = fields.get("Backing store path", "").strip()
    return TgtLun(
        lun=int(fields["LUN"]),
        type=fields.get("Type", ""),
        scsi_id=fields.get("SCSI ID", ""),
        scsi_sn=fields.get("SCSI SN", ""),
        size_mb=int(fields.get("size_mb", "0")),
        block_size=int(fields.get("block_size", "0")),
        online=_yes(fields.get("Online")),
        readonly=_yes(fields.get("Readonly")),
        backing_store_type=fields.get("Backing store type", ""),
        backing_store_path=None if path in ("", "None") else path,
        backing_store_flags=fields.get("Backing store flags", "").strip(),
    )


def _parse_lun_line(luns: list[dict[str, str]], line: str) -> None:
    lun_match = _LUN_RE.match(line)
    if lun_match:
        luns.append({"LUN": lun_match.group(1)})
        return
    if not luns:
        return
    size_match = _SIZE_RE.match(line)
    if size_match:
        luns[-1]["size_mb"], luns[-1]["block_size"] = size_match.groups()
        return
    key, sep, value = line.partition(":")
    if sep:
        luns[-1][key.strip()] = value.strip()


def parse_show_target(text: str) -> list[TgtTarget]:
    """Parse the output of ``tgtadm --lld iscsi --op show --mode target``."""
    targets: list[_TargetBuilder] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        target_match = _TARGET_RE.match(line)
        if target_match:
            targets.append(_TargetBuilder(int(target_match.group(1)), target_match.group(2)))
            section = ""
        elif line in _SECTIONS:
            section = _SECTIONS[line]
        elif targets and line:
            _parse_section_line(targets[-1], section, line)
    return [builder.build() for builder in targets]


def _parse_section_line(target: _TargetBuilder, section: str, line: str) -> None:
    if section == "lun":
        _parse_lun_line(target.luns, line)
    elif section == "acl":
        target.acl.append(line)
    elif section == "nexus":
        initiator = _INITIATOR_RE.match(line)
        if initiator:
            target.initiators.append(initiator.group(1))


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (where a local tgtd listens)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tgtadm_available() -> bool:
    """True when ``tgtadm`` is installed and a tgtd answers it."""
    if shutil.which(TGTADM) is None:
        return False
    try:
        run([TGTADM, "--lld", "iscsi", "--op", "show", "--mode", "sys"], timeout=DEFAULT_TIMEOUT)
    except OperationError:
        return False
    return True


def show_targets(timeout: float = DEFAULT_TIMEOUT) -> list[TgtTarget]:
    """Every target tgtd knows (raises CommandError or StorageError when tgtadm fails)."""
    argv = [TGTADM, "--lld", "iscsi", "--op", "show", "--mode", "target"]
    try:
        proc = run(argv, timeout=timeout)
    except CommandError:
        raise
    except OperationError as err:
        raise StorageError(f"cannot ask tgtd for its targets: {err}") from err
    try:
        return parse_show_target(proc.stdout)
    except (KeyError, ValueError) as err:
        raise StorageError(f"cannot parse tgtadm output: {err}") from err


def find_target(iqn: str, targets: list[TgtTarget] | None = None) -> TgtTarget | None:
    """The target with this IQN (asks tgtd when ``targets`` is not given), or None."""
    found = show_targets() if targets is None else targets
    return next((target for target in found if target.iqn == iqn), None)


def find_lun(iqn: str, lun: int, targets: list[TgtTarget] | None = None) -> TgtLun | None:
    """LUN ``lun`` of the target with this IQN, or None when either does not exist."""
    target = find_target(iqn, targets)
    return None if target is None else target.lun(lun)
