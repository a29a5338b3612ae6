"""Restoring several disks of a backup at once: into a directory, or each to its original
device found by identity; and defining a new domain on the restored disks.

Everything is checked before anything is written: every disk's target (found and
matched, or a new file), every layer of every disk, the new domain's XML. Then the
targets are opened (block devices exclusively, and checked to be the device that
was matched) and written one after the other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import libvirt

from libvirt_rdm_backup.domain.connection import (
    active_domains,
    define_domain,
    domain_name_taken,
    domain_xml,
)
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import IscsiSource
from libvirt_rdm_backup.domain.redefine import RestoredTarget, redefined_xml
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.engine import restore_rbd
from libvirt_rdm_backup.engine.restore import (
    Target,
    open_target,
    refuse_store_paths,
    write_disk,
)
from libvirt_rdm_backup.engine.restore_claims import claims_of
from libvirt_rdm_backup.engine.restore_rbd_original import (
    defined_rbd_disks,
    find_rbd_original,
    write_rbd_original,
)
from libvirt_rdm_backup.engine.restore_targets import (
    IscsiAuthority,
    OriginalDevice,
    find_original,
    local_tgt,
    loop_backing,
)
from libvirt_rdm_backup.engine.selection import choose_backup
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.engine.verify import checked_node
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.qemu import block_copy
from libvirt_rdm_backup.qemu.layers import node_data_bytes
from libvirt_rdm_backup.repository.ids import check_safe_name
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest

log = logging.getLogger(__name__)
_DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9_.+\-]{1,64}")


@dataclass
class DiskEntry:
    """One disk of a multi-disk restore: where it went (or would go)."""

    disk: str
    path: str
    size: int
    data_bytes: int | None = None
    zeroed_bytes: int | None = None
    matched_on: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """One entry of the ``restore --json`` document."""
        data: dict[str, Any] = {"disk": self.disk, "path": self.path, "size": self.size,
                                "data_bytes": self.data_bytes, "zeroed_bytes": self.zeroed_bytes}
        if self.matched_on is not None:
            data["matched_on"] = self.matched_on
        return data


@dataclass
class DisksResult:
    """What a restore of several disks wrote (or, ``dry_run``, would write)."""

    backup_id: str
    mode: str  # "to-dir" or "to-original"
    dry_run: bool
    disks: list[DiskEntry] = field(default_factory=list)
    defined: str | None = None  # the new domain's name
    started: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The ``restore --json`` document of ``--to-original``, ``--to-dir``, ``--define``."""
        return {"backup_id": self.backup_id, "mode": self.mode, "dry_run": self.dry_run,
                "disks": [d.to_dict() for d in self.disks], "defined": self.defined,
                "started": self.started, "notes": list(self.notes)}


@dataclass(frozen=True)
class DisksRequest:
    """What to restore where: ``disks`` (None: all), into ``to_dir`` or to the originals;
    ``define``: a new domain's name (``start`` it)."""

    disks: tuple[str, ...] | None = None
    to_dir: str | None = None
    to_original: bool = False
    dry_run: bool = False
    force: bool = False
    define: str | None = None
    start: bool = False

    def check(self) -> None:
        """UsageError for a request that does not add up."""
        if (self.to_dir is None) == (not self.to_original):
            raise UsageError("give one of --to-dir DIR or --to-original")
        for disk in self.disks or ():
            check_safe_name(disk, "disk name")
        if self.define is not None:
            if not _DOMAIN_NAME_RE.fullmatch(self.define):
                raise UsageError(f"malformed domain name {self.define[:80]!r} for --define "
                                 "(letters, digits and _ . + -)")
            if self.disks is not None:
                raise UsageError("--define restores every disk of the backup; leave out --disk")
        elif self.start:
            raise UsageError("--start needs --define NAME")


def _records(manifest: Manifest, disks: tuple[str, ...] | None) -> list[DiskRecord]:
    if disks is None:
        return list(manifest.disks)
    found = []
    for disk in dict.fromkeys(disks):
        record = manifest.disk(disk)
        if record is None:
            raise NotFoundError(f"backup {manifest.backup_id} has no disk {disk!r}")
        found.append(record)
    return found


def _dir_targets(store: Store, to_dir: str, records: list[DiskRecord]) -> dict[str, str]:
    if not os.path.isdir(to_dir):
        raise UsageError(f"restore directory {to_dir} does not exist or is not a directory")
    paths = {r.disk.target: os.path.join(to_dir, f"{r.disk.target}.raw") for r in records}
    for path in paths.values():
        if os.path.lexists(path):
            raise UsageError(f"{path} exists; --to-dir writes new files only")
        refuse_store_paths(store, path)
    return paths


def _domain_luns(conn: libvirt.virConnect | None, domain_uuid: str) -> set[IscsiSource]:
    """The iSCSI LUNs the backed-up domain uses on this connection (when it is here)."""
    if conn is None:
        return set()
    try:
        dom = conn.lookupByUUIDString(domain_uuid)
        inventory = inventory_from_xml(DomainXML.parse(domain_xml(dom, inactive=True)), False)
    except (libvirt.libvirtError, RdmBackupError):
        return set()
    return {d.iscsi for d in inventory.raw if d.iscsi is not None}


def _authority(luns: set[IscsiSource]) -> IscsiAuthority:
    def known(source: IscsiSource) -> str | None:
        return local_tgt(source) or ("the domain's definition on this host"
                                     if source in luns else None)
    return known


def _originals(records: list[DiskRecord], conn: libvirt.virConnect | None,
               manifest: Manifest, force: bool) -> dict[str, OriginalDevice]:
    authority = _authority(_domain_luns(conn, manifest.domain_uuid))
    defined = defined_rbd_disks(conn, manifest.domain_uuid) \
        if any(r.disk.rbd is not None for r in records) else None
    found = {}
    for record in records:
        claims = claims_of(record)
        found[record.disk.target] = \
            find_rbd_original(claims, conn, defined, force) if claims.rbd is not None \
            else find_original(claims, authority=authority)
    seen: dict[str, str] = {}
    for disk, device in found.items():
        if device.path in seen:
            raise UsageError(f"{disk}: {device.path} is also where {seen[device.path]} goes")
        seen[device.path] = disk
    return found


def lun_users(conn: libvirt.virConnect | None, source: IscsiSource) -> list[str]:
    """Running domains that use this iSCSI LUN (QEMU's initiator)."""
    users = []
    for dom in active_domains(conn) if conn is not None else []:
        try:
            inventory = inventory_from_xml(DomainXML.parse(domain_xml(dom)), True)
        except RdmBackupError:
            continue
        if any(d.iscsi is not None and (d.iscsi.iqn, d.iscsi.lun) == (source.iqn, source.lun)
               for d in inventory.raw):
            users.append(inventory.domain_name)
    return users


def _open_original(stack: contextlib.ExitStack, device: OriginalDevice, record: DiskRecord,
                   force: bool, conn: libvirt.virConnect | None) -> Target | None:
    """The opened block device (checked to be the one matched), or None for an iSCSI LUN
    (checked not to be used by a running domain unless ``force``) or an RBD image (checked
    when it was found)."""
    if device.rbd is not None:
        return None
    if device.iscsi is not None:
        if conn is None and not force:
            log.warning("libvirt did not answer: %s was not checked against the iSCSI LUNs of "
                        "running domains", device.path)
        users = [] if force else lun_users(conn, device.iscsi)
        if users:
            raise UsageError(f"{device.disk}: restore target {device.path} is in use by running "
                             f"domain {users[0]}; use --force to overwrite it")
        return None
    target = stack.enter_context(open_target(device.path, record.size, force, conn))
    try:
        same = target.is_block and os.fstat(target.fd).st_rdev == device.rdev and (
            device.backing is None or loop_backing(target.fd) == device.backing)
    except OSError:
        same = False
    if not same:
        raise UsageError(f"{device.disk}: {device.path} changed while it was opened; "
                         "nothing was written")
    return target


def _write_lun(node: dict[str, Any], record: DiskRecord, url: str, store: Store, speed: int,
               progress: block_copy.ProgressCallback | None) -> None:
    """Copy the disk onto the first ``record.size`` bytes of an iSCSI LUN (QEMU's initiator;
    the mirror writes zeroes wherever the backup has none)."""
    try:
        target = block_copy.Endpoint(block_copy.raw_source(url, size=record.size))
        block_copy.copy_image(block_copy.Endpoint(node, store.qemu_objects()), target,
                              record.disk.target, speed=speed, progress=progress)
    except RdmBackupError as err:
        raise OperationError(f"{err}; bytes 0-{record.size} of {url} may have been "
                             "changed") from err


def restore_disks(domain: str, target: str, request: DisksRequest,
                  backup_id: str | None = None, conn: libvirt.virConnect | None = None,
                  tls_dir: str | None = None, bwlimit: float | None = None,
                  progress: block_copy.ProgressCallback | None = None,
                  key_file: str | None = None) -> DisksResult:
    """Restore disks of ``domain``'s backup as ``request`` says (see the module's text;
    ``key_file``: the key of encrypted backups)."""
    request.check()
    speed = block_copy.bwlimit_speed(bwlimit)
    with open_store(target, tls_dir=tls_dir, key_file=key_file) as store, \
            contextlib.ExitStack() as stack:
        stack.enter_context(store.reading(choose_backup(store, domain, backup_id).domain_uuid))
        manifest = choose_backup(store, domain, backup_id)
        records = _records(manifest, request.disks)
        result = DisksResult(manifest.backup_id, "to-original" if request.to_original
                             else "to-dir", request.dry_run)
        originals: dict[str, OriginalDevice] = {}
        if request.to_original:
            originals = _originals(records, conn, manifest, request.force)
            places = {d: RestoredTarget(_kind(o), o.path, o.iscsi) for d, o in originals.items()}
            for original in originals.values():
                if original.rbd is not None:
                    restore_rbd.refuse_repository_images(store, original.rbd)
                elif original.iscsi is None:
                    refuse_store_paths(store, original.path)
        else:
            assert request.to_dir is not None
            paths = _dir_targets(store, request.to_dir, records)
            places = {d: RestoredTarget("file", os.path.abspath(p)) for d, p in paths.items()}
        xml = _new_domain(conn, manifest, request, places, result)
        for record in records:
            device = originals.get(record.disk.target)
            result.disks.append(DiskEntry(record.disk.target, places[record.disk.target].path,
                                          record.size,
                                          matched_on=device.matched_on if device else None))
        opened: dict[str, Target | None] = {}
        for record in records:  # in use or changed: refused also in a dry run
            disk = record.disk.target
            opened[disk] = _open_original(stack, originals[disk], record, request.force, conn) \
                if request.to_original else stack.enter_context(
                    open_target(places[disk].path, record.size, False, conn))
        if request.dry_run:
            return result
        nodes = {r.disk.target: checked_node(store, manifest, r.disk.target) for r in records}
        for record, entry in zip(records, result.disks, strict=True):
            image = originals.get(entry.disk)
            if image is not None and image.rbd is not None:
                entry.data_bytes = write_rbd_original(conn, store, record, image,
                                                      nodes[entry.disk], request.force, speed,
                                                      progress)
                continue
            _write_one(store, record, entry, nodes[entry.disk], opened[entry.disk], speed,
                       progress)
        if xml is not None and conn is not None:
            dom = define_domain(conn, xml, request.start)
            result.defined, result.started = dom.name(), request.start
    return result


def _kind(device: OriginalDevice) -> str:
    return "rbd" if device.rbd else "iscsi" if device.iscsi else "block"


def _write_one(store: Store, record: DiskRecord, entry: DiskEntry, node: dict[str, Any],
               dest: Target | None, speed: int,
               progress: block_copy.ProgressCallback | None) -> None:
    try:
        entry.data_bytes = node_data_bytes(node)  # layer files held open and checked
        if dest is None:
            _write_lun(node, record, entry.path, store, speed, progress)
        else:
            entry.zeroed_bytes = write_disk(node, record, dest, store.qemu_objects(), speed,
                                            progress)
    except RdmBackupError as err:
        raise OperationError(f"restore of {entry.disk} to {entry.path} failed: {err}") from err


def _new_domain(conn: libvirt.virConnect | None, manifest: Manifest, request: DisksRequest,
                places: dict[str, RestoredTarget], result: DisksResult) -> str | None:
    """The XML of the domain ``--define`` asks for, checked before anything is written."""
    if request.define is None:
        return None
    if conn is None:
        raise OperationError("--define needs libvirt, which did not answer")
    if domain_name_taken(conn, request.define):
        raise UsageError(f"a domain named {request.define} already exists")
    if not manifest.domain_xml:
        raise UsageError(f"backup {manifest.backup_id} has no domain XML to define")
    xml, notes = redefined_xml(manifest.domain_xml, request.define, places)
    result.notes += notes
    for note in notes:
        log.warning("%s", note)
    return xml
