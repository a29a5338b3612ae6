"""What a backup says its disk's original device was: the recorded mapping, checked.

The mapping document is read back from the repository, so it is untrusted input:
only the identifiers that locate or identify a device are taken from it, each
checked for type, length and form (an IQN is an IQN, a by-id name a single file
name, a loop's backing file an absolute path without control characters). No path
of it is ever opened; :mod:`.restore_targets` looks each one up in what the host
says (sysfs, ``/dev/disk/by-id``, the loop driver, the LUN's own answers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.domain.disks import IscsiSource
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.storage.base import StorageNode

KINDS = ("loop", "disk", "iscsi-lun", "rbd-image")
MAX_TEXT = 256
MAX_PATH = 4096
# what a recorded identity may say: anything else is refused before it is looked for
SYNTAX = {
    "iqn": re.compile(r"(?:iqn\.|eui\.|naa\.)[A-Za-z0-9.:\-]{1,220}"),
    "host": re.compile(r"[A-Za-z0-9.\-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]"),
    "by-id": re.compile(r"[A-Za-z0-9_.:@+\-]{1,200}"),
    "hex": re.compile(r"[0-9a-f]{2,64}"),
    "wwid": re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}"),
    "loop": re.compile(r"/dev/loop\d{1,6}"),
    "rbd-name": re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}"),
    "rbd-id": re.compile(r"[0-9a-f]{1,64}"),
    "fsid": re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
}
# the VPD 0x83 designator types that name a logical unit
_DESIGNATOR_TYPES = {"naa": "naa", "eui-64": "eui", "scsi-name-string": "name",
                     "t10-vendor-id": "t10"}


@dataclass(frozen=True)
class LoopClaim:
    """A loop device: its backing file, where in it the device starts, and its inode."""

    backing_file: str
    offset: int
    inode: int | None
    st_dev: int | None
    device: str | None  # the loop device it was (/dev/loopN), for messages only


@dataclass(frozen=True)
class RbdClaim:
    """An RBD image: where it is (the names the domain's disk and the mapping agree on) and
    who it is (its id, which a recreated image of the same name does not have)."""

    pool: str
    namespace: str | None
    image: str
    image_id: str
    cluster_fsid: str

    @property
    def name(self) -> str:
        """``pool/image`` (``pool/namespace/image`` in a namespace)."""
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)


@dataclass(frozen=True)
class Claims:
    """The identifiers of one disk's original device, strongest first."""

    disk: str
    kind: str
    path: str | None  # the device as the backup saw it (messages only)
    size: int
    designators: tuple[str, ...] = ()  # ``naa.<hex>``, ``eui.<hex>``, ``t10.<text>``, ...
    wwid: str | None = None  # the kernel's WWID of a host disk
    iscsi: IscsiSource | None = None
    serial: str | None = None
    by_id: tuple[str, ...] = ()
    loop: LoopClaim | None = None
    rbd: RbdClaim | None = None


def _bad(disk: str, what: str) -> UsageError:
    return UsageError(f"{disk}: the backup's mapping is malformed ({what}); restore it with --to")


def _text(disk: str, value: Any, what: str, limit: int = MAX_TEXT) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit \
            or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise _bad(disk, f"{what} is not a short printable string")
    return value


def _number(disk: str, value: Any, what: str, high: int = 1 << 62) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise _bad(disk, f"{what} is not a whole number in range")
    return value


def claims_of(record: DiskRecord) -> Claims:
    """The checked identifiers of ``record``'s original device (UsageError when the backup
    has no usable mapping, or one of a kind a restore to the original does not support)."""
    disk = record.disk.target
    mapping = record.mapping
    if mapping is None:
        why = f": {record.mapping_error}" if record.mapping_error else ""
        raise UsageError(f"{disk}: the backup recorded no mapping of its storage{why}; "
                         "restore it with --to")
    if mapping.disk != disk:
        raise _bad(disk, f"it describes disk {mapping.disk[:64]!r}")
    root = mapping.root
    if root.kind not in KINDS:
        hint = f"--to rbd:{record.disk.rbd.name}" if record.disk.rbd else "--to"
        raise UsageError(f"{disk}: the backup's disk was a {root.kind[:32]!r} device; a restore "
                         f"to the original finds {', '.join(KINDS)} devices; restore it with "
                         f"{hint}")
    if not isinstance(root.identity, dict):
        raise _bad(disk, "identity is not an object")
    path = _text(disk, root.path, "path", MAX_PATH)
    if root.kind == "loop":
        return Claims(disk, root.kind, path, record.size, loop=_loop_claim(disk, root))
    if root.kind == "rbd-image":
        return Claims(disk, root.kind, path, record.size, rbd=_rbd_claim(record, root))
    if root.kind == "disk":
        return _disk_claims(disk, root, path, record.size)
    return _iscsi_claims(disk, root, path, record.size)


def _disk_claims(disk: str, root: StorageNode, path: str | None, size: int) -> Claims:
    identity = root.identity
    wwid = _text(disk, identity.get("wwid"), "wwid")
    if wwid is not None and not SYNTAX["wwid"].fullmatch(wwid):
        raise _bad(disk, "wwid")
    by_id = identity.get("by_id") or []
    if not isinstance(by_id, list) or len(by_id) > 64 or not all(
            isinstance(n, str) and SYNTAX["by-id"].fullmatch(n) and n not in (".", "..")
            for n in by_id):
        raise _bad(disk, "by_id is not a list of link names")
    return Claims(disk, "disk", path, size, wwid=wwid,
                  serial=_text(disk, identity.get("serial"), "serial"), by_id=tuple(by_id))


def _iscsi_claims(disk: str, root: StorageNode, path: str | None, size: int) -> Claims:
    identity = root.identity
    iqn = _text(disk, identity.get("iqn"), "iqn")
    lun = _number(disk, identity.get("lun"), "lun", 65535)
    portal = _text(disk, identity.get("portal"), "portal") or ""
    host, _, port_text = portal.rpartition(":")
    if iqn is None or not SYNTAX["iqn"].fullmatch(iqn) or lun is None:
        raise _bad(disk, "no iSCSI IQN and LUN")
    if not SYNTAX["host"].fullmatch(host) or not port_text.isdigit() \
            or not 0 < int(port_text) < 65536:
        raise _bad(disk, "portal is not HOST:PORT")
    return Claims(disk, "iscsi-lun", path, size,
                  designators=designators_of(identity.get("designators"), disk),
                  iscsi=IscsiSource(host.strip("[]"), int(port_text), iqn, lun),
                  serial=_text(disk, identity.get("serial"), "serial"))


def designators_of(value: Any, disk: str = "") -> tuple[str, ...]:
    """The complete VPD 0x83 designators of the logical unit, as ``naa.<hex>``,
    ``eui.<hex>``, ``t10.<text>``, ``name.<text>`` (sorted; others are left out)."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 64:
        raise _bad(disk, "designators is not a list")
    found = set()
    for item in value:
        if not isinstance(item, dict):
            raise _bad(disk, "a designator is not an object")
        prefix = _DESIGNATOR_TYPES.get(str(item.get("type")))
        if prefix is None or item.get("association") != "logical-unit" \
                or item.get("complete") is not True:
            continue
        if isinstance(item.get("value_hex"), str):
            raw = item["value_hex"].lower()
            if not SYNTAX["hex"].fullmatch(raw):
                raise _bad(disk, "a designator value is not hex")
            found.add(f"{prefix}.{raw}")
        elif isinstance(item.get("value"), str) and (text := item["value"].strip()):
            found.add(f"{prefix}.{_text(disk, text, 'a designator value')}")
    return tuple(sorted(found))


def _loop_claim(disk: str, root: StorageNode) -> LoopClaim:
    identity = root.identity
    backing = _text(disk, identity.get("backing_file"), "backing_file", MAX_PATH)
    if backing is None or not backing.startswith("/") or os.path.normpath(backing) != backing:
        raise _bad(disk, "no absolute backing file")
    if identity.get("backing_file_deleted"):
        raise UsageError(f"{disk}: the backup's loop device had a deleted backing file; "
                         "restore it with --to")
    offset = _number(disk, identity.get("offset", 0), "offset") or 0
    inode = st_dev = None
    leaf = root.extents[0].target if len(root.extents) == 1 else None
    if leaf is not None and leaf.kind == "file" and isinstance(leaf.identity, dict):
        inode = _number(disk, leaf.identity.get("inode"), "inode")
        st_dev = _number(disk, leaf.identity.get("st_dev"), "st_dev")
    loop = isinstance(root.path, str) and SYNTAX["loop"].fullmatch(root.path)
    device = root.path if loop else None
    return LoopClaim(backing, offset, inode, st_dev, device)


def _rbd_claim(record: DiskRecord, root: StorageNode) -> RbdClaim:
    """The image the mapping names, which must be the one the domain's disk names."""
    disk, identity = record.disk.target, root.identity
    names = [identity.get(k) for k in ("pool", "namespace", "image")]
    if not all(n is None or (isinstance(n, str) and SYNTAX["rbd-name"].fullmatch(n))
               for n in names) or names[0] is None or names[2] is None:
        raise _bad(disk, "no RBD pool and image names")
    image_id, fsid = identity.get("image_id"), identity.get("cluster_fsid")
    if not isinstance(image_id, str) or not SYNTAX["rbd-id"].fullmatch(image_id):
        raise _bad(disk, "no RBD image id")
    if not isinstance(fsid, str) or not SYNTAX["fsid"].fullmatch(fsid):
        raise _bad(disk, "no RBD cluster_fsid")
    claim = RbdClaim(str(names[0]), names[1] or None, str(names[2]), image_id, fsid)
    source = record.disk.rbd
    if source is None or (source.pool, source.namespace or None, source.image) != \
            (claim.pool, claim.namespace, claim.image):
        named = source.name[:200] if source is not None else "no RBD image"
        raise _bad(disk, f"it names image {claim.name}, the domain's disk {named}")
    if source.snapshot:
        raise UsageError(f"{disk}: the backup's disk was the snapshot {source.url[:200]}, "
                         "which cannot be written; restore it with --to")
    return claim
