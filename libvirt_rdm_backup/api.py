"""The public, typed API: every operation of the command line, importable.

Operations on one domain take the domain first (``backup(domain, target)``,
``restore(domain, target, disk, to)``); repository-wide ones take the
repository first (``verify(target, domain=None)``, ``list_backups(target)``).

Each function opens (and closes) its own libvirt connection from ``uri``
(default: ``LIBVIRT_DEFAULT_URI`` or ``qemu:///system``). Errors are
subclasses of :class:`libvirt_rdm_backup.errors.RdmBackupError`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypedDict, Unpack

import libvirt

from libvirt_rdm_backup.domain.connection import connection, open_connection
from libvirt_rdm_backup.domain.disks import DiskInventory
from libvirt_rdm_backup.engine import backup as _backup
from libvirt_rdm_backup.engine import export as _export
from libvirt_rdm_backup.engine import live_restore as _live
from libvirt_rdm_backup.engine import mount as _mount
from libvirt_rdm_backup.engine import restore as _restore
from libvirt_rdm_backup.engine import unmount as _unmount
from libvirt_rdm_backup.engine import verify as _verify
from libvirt_rdm_backup.engine.backup import BackupOptions, BackupResult
from libvirt_rdm_backup.engine.capture import ProgressCallback
from libvirt_rdm_backup.engine.discover import open_domain, select_disks
from libvirt_rdm_backup.engine.export import Export
from libvirt_rdm_backup.engine.live_restore import LiveRestoreResult
from libvirt_rdm_backup.engine.mount import MountListing
from libvirt_rdm_backup.engine.paused_copy import paused_copy_reason
from libvirt_rdm_backup.engine.prune import PruneResult, prune_by_policy
from libvirt_rdm_backup.engine.prune_plan import ChainPlan
from libvirt_rdm_backup.engine.prune_plan import plan_prune as _plan_prune
from libvirt_rdm_backup.engine.rekey import RekeyResult, rekey_target
from libvirt_rdm_backup.engine.restore import RestoreResult
from libvirt_rdm_backup.engine.restore_all import DisksRequest, DisksResult, restore_disks
from libvirt_rdm_backup.engine.selection import domain_damage, find_domain_backups
from libvirt_rdm_backup.engine.serve import Served, ServeRequest, serve_point
from libvirt_rdm_backup.engine.stores import open_store
from libvirt_rdm_backup.engine.unmount import Undone
from libvirt_rdm_backup.engine.verify import VerifyReport
from libvirt_rdm_backup.errors import LibvirtError, RdmBackupError
from libvirt_rdm_backup.modes import Compression, Level, Quiesce
from libvirt_rdm_backup.qemu.block_copy import bwlimit_speed
from libvirt_rdm_backup.remote import SshAgent
from libvirt_rdm_backup.repository.chain import DEFAULT_CHAIN
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.retention import RetentionPolicy
from libvirt_rdm_backup.repository.store import Damage
from libvirt_rdm_backup.storage import map_disk
from libvirt_rdm_backup.storage.base import RawDiskMapping

log = logging.getLogger(__name__)


def discover(domain: str, uri: str | None = None) -> DiskInventory:
    """The domain's raw disks (with identifiers, node names, sizes) and its other disks."""
    with connection(uri) as conn:
        return open_domain(conn, domain).inventory


@dataclass
class DiskReport:
    """A domain's disks with the raw disk mapping of each raw disk (or why it has none)."""

    inventory: DiskInventory
    mappings: dict[str, RawDiskMapping] = field(default_factory=dict)
    mapping_errors: dict[str, str] = field(default_factory=dict)
    # disk -> why a backup of the running domain copies it with the guest paused
    paused_copies: dict[str, str] = field(default_factory=dict)


def describe(domain: str, uri: str | None = None) -> DiskReport:
    """:func:`discover` plus the mapping of every raw disk; mapping failures are reported."""
    inventory = discover(domain, uri)
    report = DiskReport(inventory)
    for disk in inventory.raw:
        try:
            report.mappings[disk.target] = map_disk(disk)
        except RdmBackupError as err:
            report.mapping_errors[disk.target] = str(err)
        reason = paused_copy_reason(disk)
        if reason is not None:
            report.paused_copies[disk.target] = reason
    return report


def map_disks(
    domain: str, disks: list[str] | None = None, uri: str | None = None
) -> list[RawDiskMapping]:
    """The raw disk mapping of each selected raw disk (all raw disks by default)."""
    with connection(uri) as conn:
        ctx = open_domain(conn, domain)
        return [map_disk(disk) for disk in select_disks(ctx.inventory, disks)]


class BackupSettings(TypedDict, total=False):
    """The fields of :class:`BackupOptions`, as keyword arguments of :func:`backup`."""

    level: Level | str
    chain: str
    quiesce: Quiesce | str | None
    allow_plain_nbd: bool
    tls_dir: str | None
    max_pause: float
    bwlimit: float | None
    retention: RetentionPolicy | None
    compress: Compression | str | None
    encrypt_key_file: str | None


def backup(
    domain: str,
    target: str,
    disks: list[str] | None = None,
    uri: str | None = None,
    progress: ProgressCallback | None = None,
    *,
    options: BackupOptions | None = None,
    agent: str | None = None,
    agent_identity: str | None = None,
    agent_known_hosts: str | None = None,
    **settings: Unpack[BackupSettings],
) -> BackupResult:
    """A point-in-time backup of the domain's raw disks into repository ``target``.

    How it is taken is ``options`` (:class:`BackupOptions`); ``disks``,
    ``progress`` and the keyword ``settings`` (its field names) override its fields.
    ``level``: ``full``, ``incremental``, ``differential``, ``resync`` (read each
    disk once and store the chunks that differ from its previous backup, for when
    the writes were not tracked) or ``auto`` (incremental where the chain's
    tracking is intact: dirty bitmaps, or for passthrough LUNs and RBD disks the kept
    storage snapshots; else a resync, else a full copy; each disk records why).
    ``chain`` names an independent chain with its own bitmaps and snapshots.
    ``quiesce``: None (no freeze; the guest is paused only while LUNs need it),
    ``try`` (freeze the guest's filesystems through the QEMU guest agent while
    the point in time is fixed; when the agent does not answer or cannot freeze,
    pause the guest instead: crash-consistent, with a note in the manifest's
    ``consistency``) or ``required`` (fail without a working agent).
    ``max_pause``: seconds a passthrough LUN without storage snapshots may keep the
    guest paused while it is copied (refused up front, or cancelled, beyond that).
    ``bwlimit``: MiB/s each disk's copy may move (QEMU's backup jobs of the guest, the
    copies from storage and the disk's reads of a resync against its last point read back
    alike; None: no limit; UsageError unless positive).
    ``compress``: ``zstd`` or ``zlib``: new layers are qcow2 images of that
    compression type whose clusters QEMU writes compressed (None: plain).
    ``encrypt_key_file``: new layers are LUKS-encrypted qcow2 with the key this file
    holds (not with ``compress``; see docs/encryption.md).
    ``agent`` (with ``agent_identity``, ``agent_known_hosts``): the hypervisor's
    rdm-backup agent over SSH, when ``uri`` names another machine.
    """
    given: dict[str, Any] = dict(settings)
    if disks is not None:
        given["disks"] = disks
    if progress is not None:
        given["progress"] = progress
    options = replace(options or BackupOptions(), **given)
    remote = (SshAgent(agent, identity=agent_identity, known_hosts=agent_known_hosts)
              if agent else None)  # a bad address or key file fails before anything starts
    with connection(uri) as conn:
        return _backup.backup(conn, domain, target, options, remote)


def restore(
    domain: str,
    target: str,
    disk: str,
    to: str,
    backup_id: str | None = None,
    force: bool = False,
    uri: str | None = None,
    tls_dir: str | None = None,
    bwlimit: float | None = None,
    progress: ProgressCallback | None = None,
    encrypt_key_file: str | None = None,
) -> RestoreResult:
    """Write ``disk`` as of a backup (newest by default) to the file or device ``to``.

    ``bwlimit``: MiB/s the copy may write (None: no limit); ``progress`` is called with
    (copy, bytes done, bytes in all) as the copy advances. ``encrypt_key_file``: the key
    of encrypted backups (UsageError when missing or not their key; nothing written).

    Without a libvirt connection (libvirtd down) the target is still checked
    against the kernel and the QEMU processes of this host: a restore must work on
    a host where the domain no longer exists.
    """
    conn: libvirt.virConnect | None = None
    try:
        conn = open_connection(uri)
    except LibvirtError as err:
        log.debug("%s: checking %s without libvirt", err, to)
    try:
        return _restore.restore(conn, domain, target, disk, to, backup_id=backup_id,
                                force=force, tls_dir=tls_dir, bwlimit=bwlimit,
                                progress=progress, key_file=encrypt_key_file)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def restore_many(
    domain: str,
    target: str,
    request: DisksRequest,
    backup_id: str | None = None,
    uri: str | None = None,
    tls_dir: str | None = None,
    bwlimit: float | None = None,
    progress: ProgressCallback | None = None,
    encrypt_key_file: str | None = None,
) -> DisksResult:
    """Restore disks of a backup into a directory or each to its original device (found by
    identity), and optionally define a new domain on them; see :class:`DisksRequest`.

    Without libvirt (libvirtd down) the targets are still checked against the kernel and
    this host's QEMU processes; ``request.define`` then fails before anything is written.
    """
    request.check()
    try:
        conn = open_connection(uri)
    except LibvirtError as err:
        log.debug("%s: restoring without libvirt", err)
        return restore_disks(domain, target, request, backup_id, None, tls_dir, bwlimit,
                             progress, encrypt_key_file)
    try:
        return restore_disks(domain, target, request, backup_id, conn, tls_dir, bwlimit,
                             progress, encrypt_key_file)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def live_restore(
    domain: str,
    target: str,
    backup_id: str | None = None,
    disks: list[str] | None = None,
    uri: str | None = None,
    tls_dir: str | None = None,
    bwlimit: float | None = None,
    progress: ProgressCallback | None = None,
    running: Callable[[], None] | None = None,
) -> LiveRestoreResult:
    """Start the shut-off ``domain`` on a backup (newest by default) at once, and copy each of
    ``disks`` (default: every disk of the backup) back onto its own source meanwhile; return
    once every disk runs on its source again (see docs/live-restore.md).

    ``progress`` is called with (disk, bytes copied back, bytes in all); ``running`` once
    the guest runs.
    """
    with connection(uri) as conn:
        return _live.live_restore(conn, domain, target, backup_id, disks, bwlimit, progress,
                                  tls_dir, running)


def verify(
    target: str, domain: str | None = None, backup_id: str | None = None,
    tls_dir: str | None = None, deep: bool = False, encrypt_key_file: str | None = None,
) -> VerifyReport:
    """Recompute the digests of stored data (all backups, one domain's, or one).

    ``target`` is a repository directory or an NBD volume URI. ``deep``: also read every
    point whole through QEMU (decrypted with ``encrypt_key_file`` where encrypted) and
    compare it with its chunk map, where it has one.
    """
    return _verify.verify(target, domain, backup_id, tls_dir, deep, encrypt_key_file)


def list_backups(target: str, domain: str | None = None,
                 tls_dir: str | None = None) -> list[Manifest]:
    """Published backups at ``target`` (directory or NBD volume URI), oldest first."""
    with open_store(target, tls_dir=tls_dir) as store:
        if domain is None:
            return store.scan().backups
        return find_domain_backups(store, domain)


def plan_prune(target: str, policy: RetentionPolicy, domain: str | None = None,
               chain: str | None = None, tls_dir: str | None = None) -> list[ChainPlan]:
    """Which points of each chain at ``target`` a prune with ``policy`` keeps, and why.

    Every domain's chains, or ``domain``'s (UUID or name at backup time); only chain
    ``chain`` when given. Nothing is changed. See :mod:`.engine.prune_plan`.
    """
    with open_store(target, tls_dir=tls_dir) as store:
        return _plan_prune(store, domain, chain, policy)


def prune(target: str, policy: RetentionPolicy, domain: str | None = None,
          chain: str | None = None, bwlimit: float | None = None, tls_dir: str | None = None,
          encrypt_key_file: str | None = None) -> list[tuple[ChainPlan, PruneResult]]:
    """Prune the chains :func:`plan_prune` names: dropped points leave, their data merged
    into the kept points that build on them (each kept point restores as before).

    ``bwlimit``: MiB/s QEMU's merge jobs may move. ``encrypt_key_file``: the key of an
    encrypted repository (its merges read and write encrypted layers).
    """
    with open_store(target, tls_dir=tls_dir, key_file=encrypt_key_file) as store:
        return prune_by_policy(store, policy, domain, chain, bwlimit_speed(bwlimit))


def rekey(target: str, encrypt_key_file: str, new_key_file: str,
          tls_dir: str | None = None) -> RekeyResult:
    """Change the key of every encrypted layer of the file repository or NBD volume
    ``target`` from the key of ``encrypt_key_file`` to that of ``new_key_file``
    (crash-safe: a change cut short is finished by the next call with the same two
    files; ``tls_dir``: the client credentials of an ``nbds://`` volume). See
    docs/encryption.md.
    """
    return rekey_target(target, encrypt_key_file, new_key_file, tls_dir)


def damaged_backups(target: str, domain: str | None = None,
                    tls_dir: str | None = None) -> list[Damage]:
    """Published backups at ``target`` whose manifest cannot be read (of all, or of ``domain``).

    :func:`list_backups` leaves them out; restoring or verifying them fails with
    :class:`~libvirt_rdm_backup.errors.DamagedBackupError`.
    """
    with open_store(target, tls_dir=tls_dir) as store:
        listed = store.scan()
        if domain is None:
            return listed.damaged
        readable = [m for m in listed.backups if domain in (m.domain_uuid, m.domain_name)]
        return domain_damage(store, domain, readable)


@contextlib.contextmanager
def export(
    domain: str,
    disks: list[str],
    socket: str | None = None,
    listen: str | None = None,
    target: str | None = None,
    chain: str = DEFAULT_CHAIN,
    uri: str | None = None,
    allow_remote: bool = False,
    scratch_dir: str | None = None,
) -> Iterator[Export]:
    """Serve a point in time of ``disks`` of a running domain over NBD, read-only (pull mode).

    A context manager; the yielded :class:`Export` has ``uris`` (``{disk: NBD
    URI}``, exports named by the disk), ``point_in_time`` and ``bitmap_context``
    (``qemu:dirty-bitmap:<name>``: the writes since the last backup in ``chain``
    of repository ``target``, or None). Listens on the unix socket ``socket``
    (default: a fresh one under /run/libvirt-rdm-backup) or on ``listen``
    (``HOST:PORT``, loopback only unless ``allow_remote``: no TLS). Scratch
    images of overwritten data go to ``scratch_dir`` (default /var/tmp). On exit
    everything is removed from QEMU and the host; the chain's bitmaps stay.
    """
    options = _export.ExportOptions(socket, listen, target, chain, allow_remote, scratch_dir)
    with connection(uri) as conn, _export.export(conn, domain, disks, options) as handle:
        yield handle


@contextlib.contextmanager
def serve(domain: str, target: str, disk: str, backup_id: str | None = None,
          socket: str | None = None, listen: str | None = None, tls_dir: str | None = None,
          verify: bool = True, encrypt_key_file: str | None = None) -> Iterator[Served]:
    """Serve disk ``disk`` of a backup point read-only over NBD, without copying it.

    A context manager; the yielded :class:`Served` has ``uri``, ``backup_id``, ``size``,
    ``export`` and ``to_dict()`` (what ``serve --json`` prints). Exactly one of ``socket``
    (a unix socket path) and ``listen`` (``HOST:PORT``; TLS with ``tls_dir``). The layers'
    digests are checked first unless ``verify`` is False. Leaving the block stops serving.
    """
    request = ServeRequest(domain, target, disk, backup_id, socket, listen, tls_dir, verify,
                           encrypt_key_file)
    with serve_point(request) as served:
        yield served


def mount(domain: str, target: str, disk: str, mountpoint: str, backup_id: str | None = None,
          tls_dir: str | None = None, verify: bool = True,
          encrypt_key_file: str | None = None) -> MountListing:
    """Mount the filesystems of a backup point read-only under ``mountpoint`` (a background
    supervisor keeps them mounted until :func:`umount`)."""
    request = ServeRequest(domain, target, disk, backup_id, tls_dir=tls_dir, verify=verify,
                           key_file=encrypt_key_file)
    return _mount.mount(request, mountpoint)


def umount(mountpoint: str) -> Undone:
    """Undo a :func:`mount`."""
    return _unmount.umount(mountpoint)
