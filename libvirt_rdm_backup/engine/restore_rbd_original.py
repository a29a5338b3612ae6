"""A disk's original RBD image for ``--to-original``: found, checked, and written.

The image is the one the backed-up domain's definition on this host (found by the
backup's domain UUID) has at the disk's target, which must be the one the backup's
mapping and disk name (pool, namespace, image); the cluster is reached only with
what that definition says (its monitors or config file, cephx user and libvirt
secret, whose key is read through libvirt as for a backup), never with what the
backup says. A domain not defined here, or whose disk there is another image or no
RBD image, is refused: ``--to rbd:POOL/IMAGE?conf=PATH&id=USER`` names the image
and cluster instead. The image must still be the backed-up one (the cluster fsid
and image id the backup recorded: an image removed and made anew under the name is
refused), at least as large as the disk, and not in use (a running domain's disk, a
watcher, a lock holder or the owner of its exclusive lock) unless ``--force``. It
is written through the same path as ``--to rbd:POOL/IMAGE`` (:mod:`.restore_rbd`),
which checks it once more.
"""

from __future__ import annotations

import logging
from typing import Any

import libvirt

from libvirt_rdm_backup.domain.connection import active_domains, domain_xml
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import RbdSource
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.engine import restore_rbd
from libvirt_rdm_backup.engine.discover import learn_rbd_key
from libvirt_rdm_backup.engine.restore_claims import Claims, RbdClaim
from libvirt_rdm_backup.engine.restore_targets import OriginalDevice, human
from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.qemu.block_copy import ProgressCallback
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.storage import rbd_dest

log = logging.getLogger(__name__)
ImageKey = tuple[str, str | None, str]  # pool, namespace, image


def _key(source: RbdSource | RbdClaim) -> ImageKey:
    return source.pool, source.namespace or None, source.image


def _rbd_disks(xml: str, running: bool) -> list[RbdSource]:
    inventory = inventory_from_xml(DomainXML.parse(xml), running)
    return [d.rbd for d in inventory.raw if d.rbd is not None and not d.rbd.snapshot]


def defined_rbd_disks(conn: libvirt.virConnect | None,
                      domain_uuid: str) -> dict[str, RbdSource | None] | None:
    """The backed-up domain's definition on this host: each disk target's RBD image (None
    for a disk that is no RBD image); None when the domain is not defined here."""
    if conn is None:
        return None
    try:
        dom = conn.lookupByUUIDString(domain_uuid)
        inventory = inventory_from_xml(DomainXML.parse(domain_xml(dom, inactive=True)), False)
    except (libvirt.libvirtError, RdmBackupError):
        return None
    disks: dict[str, RbdSource | None] = {d.target: None for d in inventory.other}
    disks.update({d.target: d.rbd if d.rbd is not None and not d.rbd.snapshot else None
                  for d in inventory.raw})
    return disks


def defined_cluster(conn: libvirt.virConnect | None, domain_uuid: str, record: DiskRecord,
                    to: str) -> RbdSource | None:
    """For ``--to rbd:POOL/IMAGE`` without ``conf``/``id``: the backed-up RBD disk's
    cluster and credentials as the domain's definition on this host has them at the disk's
    target, never as the backup says (its config file, monitors and secret are data read
    back); None for a disk that was no RBD image, or a ``to`` naming its own cluster. A
    definition without an RBD image there is refused (UsageError)."""
    restore_rbd.parse(to, None)  # a malformed spec is refused as such
    if record.disk.rbd is None or "?" in to:
        return None
    own = (defined_rbd_disks(conn, domain_uuid) or {}).get(record.disk.target)
    if own is None:
        raise UsageError(
            f"{record.disk.target}: the backed-up disk was an RBD image, and the domain's "
            f"definition on this host has none at {record.disk.target} to say which cluster, "
            "user and secret to use (the backup's own are not taken); name them: --to "
            f"{to.partition('?')[0]}?conf=PATH&id=USER")
    return own


def running_users(conn: libvirt.virConnect | None, claim: RbdClaim) -> list[str]:
    """Running domains with a disk on the image."""
    users = []
    for dom in active_domains(conn) if conn is not None else []:
        try:
            if any(_key(s) == _key(claim) for s in _rbd_disks(domain_xml(dom), True)):
                users.append(str(dom.name()))
        except (libvirt.libvirtError, RdmBackupError):
            continue
    return users


def _reach(claims: Claims, defined: dict[str, RbdSource | None] | None) -> RbdSource:
    """The claimed image as the domain's definition on this host has it at the disk's target
    (its cluster and credentials); UsageError when the definition does not have it there."""
    claim, disk = claims.rbd, claims.disk
    assert claim is not None
    hint = f"restore it with --to rbd:{claim.name}?conf=PATH&id=USER"
    if defined is None:
        raise UsageError(f"{disk}: the backed-up domain is not defined on this host, whose "
                         f"definition alone says which image and cluster are its disk's; {hint}")
    own = defined.get(disk)
    if own is None or _key(own) != _key(claim):
        has = f"rbd:{own.name[:200]}" if own is not None else \
            "no RBD image" if disk in defined else "no such disk"
        raise UsageError(f"{disk}: the domain's definition on this host has {has} at {disk}, "
                         f"the backup's disk was rbd:{claim.name}; {hint}")
    return own


def find_rbd_original(claims: Claims, conn: libvirt.virConnect | None,
                      defined: dict[str, RbdSource | None] | None,
                      force: bool) -> OriginalDevice:
    """The disk's original image, checked (UsageError naming what differs). ``defined``:
    :func:`defined_rbd_disks` of the backed-up domain."""
    claim, disk = claims.rbd, claims.disk
    assert claim is not None
    source = _reach(claims, defined)
    learn_rbd_key(conn, source)
    url = f"rbd:{claim.name}"
    state = rbd_dest.inspect(source, f"{disk}: {url}")
    if state is None:
        raise UsageError(f"{disk}: no RBD image {claim.name} in its cluster (the backup's had "
                         f"id {claim.image_id}); restore it with --to {url}, which creates it")
    if state.cluster_fsid != claim.cluster_fsid:
        raise UsageError(f"{disk}: {url} is in cluster {state.cluster_fsid}, the backup's "
                         f"image was in cluster {claim.cluster_fsid}")
    if state.image_id != claim.image_id:
        raise UsageError(f"{disk}: {url} has image id {state.image_id}, the backup's image had "
                         f"{claim.image_id} (removed and made anew since); restore it with "
                         f"--to {url}")
    if state.size < claims.size:
        raise UsageError(f"{disk}: {url} is {human(state.size)}, the disk is "
                         f"{human(claims.size)}")
    if not force:
        running = running_users(conn, claim)
        if running:
            raise UsageError(f"{disk}: restore target {url} is in use by running domain "
                             f"{running[0]}; use --force to overwrite it")
        if state.users:
            raise UsageError(f"{disk}: restore target {url} is in use "
                             f"({'; '.join(state.users)}); use --force to overwrite it")
    return OriginalDevice(disk, url, state.size,
                          f"RBD image id {claim.image_id} of {claim.name} in cluster "
                          f"{state.cluster_fsid} (reached through the domain's definition on "
                          "this host)", rbd=source, image_id=state.image_id)


def write_rbd_original(conn: libvirt.virConnect | None, store: Store, record: DiskRecord,
                       device: OriginalDevice, node: dict[str, Any], force: bool, speed: int,
                       progress: ProgressCallback | None) -> int:
    """Write the disk into its checked original image; returns the bytes of data."""
    assert device.rbd is not None and device.image_id is not None

    def chain() -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
        return node, store.qemu_objects()

    return restore_rbd.restore_to_rbd(conn, record, device.path, chain, store=store,
                                      force=force, speed=speed, progress=progress,
                                      original=(device.rbd, device.image_id))
