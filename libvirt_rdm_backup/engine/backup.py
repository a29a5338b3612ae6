"""Backup: discover → map → plan → capture → publish, with chains of dirty-bitmap layers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import libvirt

from libvirt_rdm_backup.consistency import watchdog_ahead
from libvirt_rdm_backup.domain.connection import connection_uri, is_remote
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.engine import deferred
from libvirt_rdm_backup.engine.capture import (
    Capture,
    CaptureOptions,
    ProgressCallback,
    capture,
    drop_new_snapshots,
)
from libvirt_rdm_backup.engine.discover import (
    DomainContext,
    fill_live_facts,
    open_domain,
    select_disks,
)
from libvirt_rdm_backup.engine.paused_copy import (
    DEFAULT_MAX_PAUSE,
    check_max_pause,
    refuse_long_pauses,
)
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan, Facts, overall_level, plan_backup
from libvirt_rdm_backup.engine.prune import PruneResult, prune_after_backup
from libvirt_rdm_backup.engine.readback import parent_images
from libvirt_rdm_backup.engine.records import MappingResult, record_disk
from libvirt_rdm_backup.engine.sinks import Session
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.errors import DamagedBackupError, RdmBackupError, UsageError
from libvirt_rdm_backup.events import describe_restart
from libvirt_rdm_backup.locks import domain_lock
from libvirt_rdm_backup.modes import Compression, Level, Quiesce, parse_choice
from libvirt_rdm_backup.qemu import bitmaps
from libvirt_rdm_backup.qemu.block_copy import bwlimit_speed
from libvirt_rdm_backup.qemu.layer_format import refuse_compressed_encryption
from libvirt_rdm_backup.qemu.leftovers import remove_leftovers
from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor, Monitor
from libvirt_rdm_backup.remote import SshAgent
from libvirt_rdm_backup.repository.chain import (
    DEFAULT_CHAIN,
    Chain,
    DiskPoint,
    chain_of,
    unusable_points,
)
from libvirt_rdm_backup.repository.chunks import ChunkMap
from libvirt_rdm_backup.repository.ids import (
    check_safe_name,
    elapsed_seconds,
    new_backup_id,
    now_iso,
)
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.order import newest_damage
from libvirt_rdm_backup.repository.retention import RetentionPolicy
from libvirt_rdm_backup.repository.store import Damage
from libvirt_rdm_backup.storage import map_disk
from libvirt_rdm_backup.storage.snapshot_agents import (
    agent_by_name,
    find_snapshot_agent,
    manifest_snapshot,
)
from libvirt_rdm_backup.storage.snapshots import scoped_prefix
from libvirt_rdm_backup.targets.uri import parse_target
from libvirt_rdm_backup.window_record import recover_window

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackupOptions:
    """How a backup is taken: everything but the domain, the target and the connection.

    ``disks``: the raw disks to back up (all by default). ``level``: see :class:`Level`.
    ``chain`` names an independent chain with its own bitmaps and snapshots.
    ``quiesce``: freeze the guest's filesystems through its agent while the point in
    time is fixed (:class:`Quiesce`). ``allow_plain_nbd``: an ``nbd://`` target on
    another host without TLS. ``tls_dir``: the client credentials of an ``nbds://``
    target. ``max_pause``: seconds a passthrough LUN without storage snapshots may
    keep the guest paused while it is copied. ``bwlimit``: MiB/s each disk's copy may
    move (None: no limit). ``retention``: prune the chain with this policy after the
    backup is published (None: no prune). ``compress``: new layers written with
    compressed clusters, ``zstd`` or ``zlib`` (None: plain). ``encrypt_key_file``: new
    layers are LUKS-encrypted with the key this file holds. ``progress(job, done, total)`` is
    called while QEMU jobs run. Strings are accepted for the enums; a bad value
    raises UsageError.
    """

    disks: list[str] | None = None
    level: Level = Level.AUTO
    chain: str = DEFAULT_CHAIN
    quiesce: Quiesce | None = None
    allow_plain_nbd: bool = False
    tls_dir: str | None = None
    max_pause: float = DEFAULT_MAX_PAUSE
    bwlimit: float | None = None
    retention: RetentionPolicy | None = None
    compress: Compression | None = None
    encrypt_key_file: str | None = None
    progress: ProgressCallback | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "level", parse_choice(Level, self.level, "level"))
        if self.quiesce is not None:
            object.__setattr__(self, "quiesce",
                               parse_choice(Quiesce, self.quiesce, "quiesce mode"))
        if self.compress is not None:
            object.__setattr__(self, "compress",
                               parse_choice(Compression, self.compress, "compression"))
        refuse_compressed_encryption(self.compress, self.encrypt_key_file is not None)
        check_safe_name(self.chain, "chain name")
        check_max_pause(self.max_pause)
        bwlimit_speed(self.bwlimit)


@dataclass
class BackupResult:
    """What a finished backup reports."""

    manifest: Manifest
    path: str
    pruned: PruneResult | None = None  # what ``--prune`` did after the publish

    def to_dict(self) -> dict[str, Any]:
        """The ``backup --json`` document."""
        m = self.manifest
        return {
            "backup_id": m.backup_id,
            "domain_uuid": m.domain_uuid,
            "domain_name": m.domain_name,
            "level": m.level,
            "reason": m.reason,
            "chain": m.chain,
            "parent": m.parent,
            "created": m.created,
            "completed": m.completed,
            "consistency": m.consistency,
            "elapsed_s": round(elapsed_seconds(m.created, m.completed), 3),
            "bytes_transferred": sum(d.bytes_transferred for d in m.disks),
            "path": self.path,
            "disks": [
                {
                    "disk": d.disk.target,
                    "size": d.size,
                    "bytes_transferred": d.bytes_transferred,
                    "stored_bytes": d.stored_bytes,
                    "compression": d.compression,
                    "level": d.level,
                    "reason": d.reason,
                    "parent": d.parent,
                    "data_path": d.data_path,
                    "data_file": d.data_file,
                    "digest": d.digest.to_dict(),
                }
                for d in m.disks
            ],
            "pruned": None if self.pruned is None else {
                "dropped": self.pruned.dropped, "bytes_moved": self.pruned.bytes_moved,
                "freed_bytes": self.pruned.freed_bytes},
        }


def _mapping_of(disk: RawDisk, remote: SshAgent | None) -> MappingResult:
    """The disk's raw disk mapping, asked of the hypervisor's agent when remote."""
    try:
        return (remote.map_disk(disk) if remote else map_disk(disk)), None
    except RdmBackupError as err:
        log.warning("disk %s: no raw disk mapping: %s", disk.target, err)
        return None, str(err)


def _prune_snapshots(plans: list[DiskPlan], scope: Callable[[DiskPlan], str],
                     keep: set[str]) -> None:
    """Delete storage snapshots of this chain that no manifest refers to (killed runs)."""
    for plan in plans:
        if plan.agent is None:
            continue
        try:
            for name in agent_by_name(plan.agent).prune(plan.disk, scope(plan), keep):
                log.info("removed storage snapshot %s left by an earlier run", name)
        except RdmBackupError as err:
            log.warning("could not look for leftover snapshots of %s: %s", plan.disk.target, err)


def _refuse_local_reads(plans: list[DiskPlan]) -> None:
    """A remote hypervisor's devices cannot be read from here: refuse such copies."""
    for plan in plans:
        if plan.path is DataPath.STORAGE and plan.disk.iscsi is None:
            raise UsageError(
                f"disk {plan.disk.target} must be read from {plan.disk.source} on the "
                "hypervisor itself (a shut-off domain, or a LUN without snapshot storage); "
                "run the backup on the hypervisor for it, or leave it out with --disk")


def _live_bitmaps(monitor: Monitor | None) -> dict[str, set[str]]:
    if monitor is None:
        return {}
    return {node: set(names) for node, names in bitmaps.node_bitmaps(monitor).items()}


def _finish_tracking(monitor: Monitor | None, repo_id: str, chain: Chain, domain_uuid: str,
                     superseded: list[tuple[RawDisk, DiskPoint]]) -> None:
    """After publishing: drop the bitmaps and storage snapshots no later backup can use."""
    deferred.drop_superseded(repo_id, chain, domain_uuid, superseded)
    if monitor is None:
        return
    try:
        bitmaps.remove_unneeded(monitor, bitmaps.chain_prefix(repo_id, chain.name),
                                chain.needed_bitmaps())
    except RdmBackupError as err:
        log.warning("could not drop old dirty bitmaps (the next run will): %s", err)


def _snapshot_facts(selected: list[RawDisk], chain: Chain, repo_id: str
                    ) -> tuple[dict[str, str], set[str]]:
    """Which disks a storage agent can snapshot, and which kept snapshots still exist."""
    agents: dict[str, str] = {}
    for disk in selected:
        agent = find_snapshot_agent(disk)
        if agent is not None:
            agents[disk.target] = agent.name
    live: set[str] = set()
    for disk in selected:
        for point in chain.kept_points(disk.target):
            data = point.record.storage_snapshot
            found = data and manifest_snapshot(data, disk, repo_id, chain.name, point.backup_id)
            if not found:
                continue
            try:
                if found[0].exists(disk, found[1]):
                    live.add(found[1].name)
            except RdmBackupError as err:
                log.warning("storage snapshot %s unusable: %s", found[1].name, err)
    return agents, live


def _damage_facts(store: Store, listed: list[Damage], chain: Chain, selected: list[RawDisk]
                  ) -> tuple[dict[str, dict[str, str]], tuple[str, str] | None]:
    """Which points of the chain cannot be built on, and a damaged backup newer than all.

    Cheap: manifests readable, layers present with their recorded sizes, no damage
    recorded by a verify or restore; the digests themselves are for verify and restore.
    ``listed``: the domain's backups whose manifests cannot be read.
    """
    damaged = {d.backup_id: d.problem for d in listed}
    unusable = {disk.target: unusable_points(chain.backups, disk.target, store.damage, damaged)
                for disk in selected}
    newer = newest_damage(listed, chain.backups)
    return unusable, ((newer, damaged[newer]) if newer else None)


def _parent_maps(store: Store, plans: list[DiskPlan]) -> dict[str, ChunkMap]:
    """The chunk maps of the points the planned layers build on (where kept)."""
    maps: dict[str, ChunkMap] = {}
    for plan in plans:
        if plan.parent is None:
            continue
        try:
            found = store.chunk_map(plan.parent)
        except RdmBackupError as err:
            if plan.level is Level.RESYNC:
                raise DamagedBackupError(plan.parent.backup_id, str(err),
                                         plan.disk.target) from err
            log.warning("disk %s: %s; the new point gets no chunk map", plan.disk.target, err)
            continue
        if found is not None:
            maps[plan.disk.target] = found
    return maps


def _prepare_qemu(ctx: DomainContext, repo_id: str, chain: Chain) -> Monitor | None:
    """Remove leftovers of killed runs; return the monitor of a running domain."""
    if not ctx.inventory.running:
        return None
    recover_window(ctx.dom)
    monitor = LibvirtMonitor(ctx.dom)
    if remove_leftovers(monitor):
        fill_live_facts(ctx.dom, ctx.inventory)  # a removed filter node changes node names
    bitmaps.remove_unneeded(monitor, bitmaps.chain_prefix(repo_id, chain.name),
                            chain.needed_bitmaps())
    return monitor


def _refuse_remote_directory(conn: libvirt.virConnect, target: str,
                             options: BackupOptions) -> None:
    """Parse the target (its errors come first); a directory needs QEMU on this host."""
    parsed = parse_target(target, allow_remote_plain=options.allow_plain_nbd)
    if options.encrypt_key_file and is_remote(conn):
        raise UsageError(f"--encrypt-key-file needs QEMU on this host (it gets the key as a "
                         f"descriptor), not through {connection_uri(conn)}")
    if isinstance(parsed, str) and is_remote(conn):
        raise UsageError(
            f"a directory target needs a local libvirt connection: through "
            f"{connection_uri(conn)} QEMU runs on another host and cannot write into "
            f"{target}; use an NBD target (nbds://, nbd://) there")


def _plan(ctx: DomainContext, selected: list[RawDisk], store: Store, chain: Chain,
          unreadable: list[Damage], monitor: Monitor | None, options: BackupOptions,
          agent: SshAgent | None) -> list[DiskPlan]:
    """Plan each selected disk's layer from what the chain, QEMU and the storage hold."""
    restart = describe_restart(ctx.uuid, chain.last.created) if chain.last else None
    agents, live_snapshots = (_snapshot_facts(selected, chain, store.repo_id)
                              if agent is None else ({}, set()))
    unusable, damaged_newer = _damage_facts(store, unreadable, chain, selected)
    facts = Facts(ctx.inventory.running, chain, _live_bitmaps(monitor), restart,
                  agents, live_snapshots, store.resync_layers, store.storage_layers,
                  unusable=unusable, damaged_newer=damaged_newer, repo_id=store.repo_id,
                  remote=is_remote(ctx.dom.connect()))
    return plan_backup(selected, options.level, facts)


@dataclass
class _Point:
    """One captured point of a domain, before its manifest is published."""

    ctx: DomainContext
    chain: Chain
    backup_id: str
    created: str
    plans: list[DiskPlan]
    captured: Capture
    mappings: dict[str, MappingResult]
    parent_maps: dict[str, ChunkMap]


def _manifest(point: _Point, session: Session) -> Manifest:
    """The manifest of a captured point, its layers recorded from the session."""
    plans, chain = point.plans, point.chain
    records = [record_disk(p, session, point.captured, point.mappings[p.disk.target],
                           point.parent_maps.pop(p.disk.target, None)) for p in plans]
    return Manifest(
        backup_id=point.backup_id,
        domain_uuid=point.ctx.uuid,
        domain_name=point.ctx.name,
        level=overall_level(plans),
        reason="; ".join(f"{p.disk.target}: {p.reason}" for p in plans),
        chain=chain.name,
        parent=chain.last.backup_id if chain.last else None,
        created=point.created,
        completed=now_iso(),
        consistency=point.captured.window.to_dict(),
        domain_xml=point.ctx.xml_text,
        disks=records,
    )


def _publish(point: _Point, session: Session, monitor: Monitor | None
             ) -> tuple[Manifest, str]:
    """Publish the point's manifest; on failure drop the snapshots and bitmaps it added."""
    try:
        manifest = _manifest(point, session)
        return manifest, session.publish(manifest)
    except BaseException:
        drop_new_snapshots(point.plans, point.captured)
        if monitor is not None:
            for plan in point.plans:
                name = point.captured.new_bitmaps.get(plan.disk.target)
                if name:
                    bitmaps.remove(monitor, str(plan.disk.node_name), name)
        raise


def backup(conn: libvirt.virConnect, domain: str, target: str,
           options: BackupOptions | None = None, agent: SshAgent | None = None
           ) -> BackupResult:
    """Take a point-in-time backup of a domain's raw disks into the repository ``target``.

    ``target`` is a repository directory or an NBD export (``nbd://``, ``nbds://``,
    ``nbd+unix://``) that holds a backup volume. ``agent``: the hypervisor's agent
    (over SSH) for what only the hypervisor can answer, when it is another machine:
    then nothing of this machine's storage is used for the disks.

    ``options.level`` is ``full``, ``incremental`` (writes since the chain's previous
    backup), ``differential`` (since the chain's last full), ``resync`` or ``auto``
    (incremental where tracking is intact, else a resync or a full copy, with the
    reason). A copy of a passthrough LUN the LUN's measured read rate says would keep
    the guest paused longer than ``options.max_pause`` is refused before anything is
    paused, and one that reaches the bound is cancelled. ``options.bwlimit``: MiB/s each
    disk's copy may move (QEMU's backup jobs, the copies from storage and the reads of a
    resync against its last point read back alike).
    """
    options = options or BackupOptions()
    speed = bwlimit_speed(options.bwlimit)
    chain_name = options.chain
    _refuse_remote_directory(conn, target, options)  # fails first
    ctx = open_domain(conn, domain)
    selected = select_disks(ctx.inventory, options.disks)
    store = open_store(target, create=True, allow_plain_nbd=options.allow_plain_nbd,
                       tls_dir=options.tls_dir, key_file=options.encrypt_key_file)
    holds = ctx.inventory.running and (options.quiesce is not None
                                       or any(d.is_passthrough_lun for d in selected))
    with store, domain_lock(ctx.uuid), store.lock(ctx.uuid), \
            watchdog_ahead(ctx.dom if holds else None):
        published, unreadable = store.scan(ctx.uuid)
        chain = chain_of(published, chain_name)
        monitor = _prepare_qemu(ctx, store.repo_id, chain)
        plans = _plan(ctx, selected, store, chain, unreadable, monitor, options, agent)

        def scope(plan: DiskPlan) -> str:
            return scoped_prefix(store.repo_id, chain_name, plan.disk.target)

        deferred.settle_disks(ctx.uuid, [p.disk.target for p in plans])
        _prune_snapshots(plans, scope, chain.needed_snapshots())
        parent_maps, parent_nodes = _parent_maps(store, plans), parent_images(store, chain, plans)
        if agent is not None:
            _refuse_local_reads(plans)
        mappings = {disk.target: _mapping_of(disk, agent) for disk in selected}
        refuse_long_pauses(plans, ctx.inventory.running, options.max_pause, speed)
        backup_id = new_backup_id({m.backup_id for m in published}
                                  | {d.backup_id for d in unreadable})
        created = now_iso()
        with store.session(ctx.uuid, backup_id, store.new_layers(options.compress)) as session:
            captured = capture(ctx.dom, ctx.inventory.running, plans, session, CaptureOptions(
                bitmaps.bitmap_name(store.repo_id, chain_name, backup_id), parent_maps,
                parent_images=parent_nodes,
                progress=options.progress, quiesce=options.quiesce, snapshot_scope=scope,
                max_pause=options.max_pause, monitor=monitor, speed=speed))
            manifest, path = _publish(
                _Point(ctx, chain, backup_id, created, plans, captured, mappings, parent_maps),
                session, monitor)
        superseded = [(d, point) for d in selected
                      for point in chain.kept_points(d.target) if point.record.storage_snapshot]
        chain.backups.append(manifest)
        _finish_tracking(monitor, store.repo_id, chain, ctx.uuid, superseded)
    pruned = None
    if options.retention is not None:  # only after a successful publish
        with store.keys():
            pruned = prune_after_backup(store, manifest, options.retention, speed)
    return BackupResult(manifest=manifest, path=path, pruned=pruned)
