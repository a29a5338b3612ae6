"""Restore into a Ceph RBD image: ``--to rbd:POOL[/NAMESPACE]/IMAGE[?conf=PATH&id=USER]``.

Credentials: without ``conf``/``id``, those of the backed-up disk when it was an RBD
disk, as the domain's definition on this host has them (its monitors, cephx user and
libvirt secret, read through libvirt; never the backup's own), else Ceph's default
configuration as client.admin; with them, that config file and user.
A key not read from libvirt comes from ``RDM_BACKUP_CEPH_KEYRING``. The image is
written by QEMU's rbd driver in a private storage daemon, which gets the key over
QMP as a ``secret`` object (never in argv or logs): sparse, zeros not written; an
existing image is made to read as zero first (the mirror job's zeroing, discards),
a missing one is created thin with the disk's size.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import libvirt

from libvirt_rdm_backup.domain.disks import RbdSource
from libvirt_rdm_backup.engine.discover import learn_rbd_key
from libvirt_rdm_backup.engine.rbd_store import RbdStore
from libvirt_rdm_backup.engine.storage_reads import rbd_endpoint
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, UsageError
from libvirt_rdm_backup.qemu.block_copy import Endpoint, ProgressCallback, copy_image
from libvirt_rdm_backup.qemu.layers import node_data_bytes
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.storage import rbd_dest

log = logging.getLogger(__name__)

PREFIX = "rbd:"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # with fullmatch
_CONF_RE = re.compile(r"/[^\x00-\x1f\x7f]{0,4094}")  # absolute, no control characters
_FORM = "rbd:POOL/IMAGE, rbd:POOL/NAMESPACE/IMAGE, optionally ?conf=/PATH&id=USER"


def is_rbd(to: str) -> bool:
    """True when ``--to`` names an RBD image."""
    return to.startswith(PREFIX)


def parse(to: str, disk: RbdSource | None) -> RbdSource:
    """The image ``to`` names, with the cluster and user to reach it (UsageError for a
    malformed one). ``disk``: the backed-up disk's RBD source, whose cluster and user
    apply when ``to`` names no ``conf``/``id``."""
    spec, mark, query = to.removeprefix(PREFIX).partition("?")
    parts = spec.split("/")
    if len(parts) not in (2, 3) or not all(_NAME_RE.fullmatch(p) for p in parts):
        raise UsageError(f"malformed RBD destination {to!r}: give {_FORM}")
    try:
        fields = parse_qs(query, strict_parsing=True) if mark else {}
    except ValueError:
        raise UsageError(f"malformed RBD destination {to!r}: give {_FORM}") from None
    conf, user = fields.pop("conf", [None]), fields.pop("id", [None])
    if fields or (mark and conf == user == [None]) or len(conf) != 1 or len(user) != 1 \
            or (conf[0] is not None and not _CONF_RE.fullmatch(conf[0])) \
            or (user[0] is not None and not _NAME_RE.fullmatch(user[0])):
        raise UsageError(f"malformed RBD destination {to!r}: give {_FORM}")
    pool, image = parts[0], parts[-1]
    namespace = parts[1] if len(parts) == 3 else None
    if conf[0] is None and user[0] is None and disk is not None:
        return dataclasses.replace(disk, pool=pool, image=image, namespace=namespace,
                                   snapshot=None)
    return RbdSource(pool=pool, image=image, namespace=namespace, user=user[0],
                     config_file=conf[0])


def refuse_repository_images(store: object, source: RbdSource) -> None:
    """Refuse an image of the ``rbd://`` repository being read (same pool, its prefix)."""
    if isinstance(store, RbdStore) and store.address.pool == source.pool \
            and not source.namespace and source.image.startswith(f"{store.base}."):
        raise UsageError(f"restore target {source.url} is an image of the backup repository "
                         f"{store.name}; writing it would destroy backups")


def restore_to_rbd(conn: libvirt.virConnect | None, record: DiskRecord, to: str,
                   chain: Callable[[], tuple[dict[str, Any], tuple[dict[str, Any], ...]]],
                   *, store: object = None, force: bool = False, speed: int = 0,
                   progress: ProgressCallback | None = None,
                   original: tuple[RbdSource, str] | None = None,
                   cluster: RbdSource | None = None) -> int:
    """Write the disk of ``record`` into the RBD image ``to``; returns the bytes of data.

    ``cluster``: the cluster and credentials ``to`` without ``conf``/``id`` means (the
    backed-up disk's, from the domain's definition on this host; None: Ceph's defaults).

    ``chain`` verifies the stored layers and returns the image node and its QEMU
    objects; it is called once the destination is checked, before anything is written.
    ``original``: the disk's own image (reached as this source) and the id it must
    still have; it is never created.
    """
    label = record.disk.target
    what = f"restore target {to.partition('?')[0]}"
    source = original[0] if original is not None else parse(to, cluster)
    refuse_repository_images(store, source)
    learn_rbd_key(conn, source)
    dest = rbd_dest.prepare(source, record.size, force, what,
                            original[1] if original is not None else None)
    try:
        node, objects = chain()
        data = node_data_bytes(node)  # the whole chain opens, or nothing written
    except BaseException:
        if dest.created:
            rbd_dest.remove(source, what)
        raise
    try:
        copy_image(Endpoint(node, objects), rbd_endpoint(source, record.size, what), label,
                   speed=speed, progress=progress)
    except BaseException as err:
        if dest.created:
            rbd_dest.remove(source, what)
        if not isinstance(err, RdmBackupError):
            raise
        changed = "the image it created was removed" if dest.created else \
            f"bytes 0-{record.size} of the image may have been changed"
        raise OperationError(f"restore of {label} to {source.url} failed: {err}; "
                             f"{changed}") from err
    return data
