"""iSCSI LUNs of the local tgtd served by tgt's ``rbd`` backing store (Debian ``tgt-rbd``).

``tgtadm --op show`` reports such a LUN as ``Backing store type: rbd`` with the path
``[pool/]image[@snapshot]`` (tgt's own syntax: no pool means ``rbd``). It never shows the
``--bsopts`` the LUN was made with (``conf=``, ``id=``), so the Ceph client options come
from ``RDM_BACKUP_TGT_RBD`` in the same syntax (``conf=/etc/ceph/ceph.conf;id=tgt``);
unset, Ceph's defaults apply (``/etc/ceph/ceph.conf``, ``client.admin``), as for a LUN
made without bsopts. The key is the one that conf names (``keyring``), or the one in
``RDM_BACKUP_CEPH_KEYRING`` (:mod:`.rbd`).

What tgtadm reports is checked before it is used: the pool and image names
(:func:`parse_image_path`), and, on the cluster, that the image is the one tgtd serves
(:func:`served_problem`: of the LUN's size, and held open by a client other than this one).
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, RbdSource
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, StorageError
from libvirt_rdm_backup.storage import tgt
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.rbd_mapping import image_node

BACKING_STORE = "rbd"
BSOPTS_ENV = "RDM_BACKUP_TGT_RBD"
DEFAULT_POOL = "rbd"  # tgt's parse_imagepath: a path without a pool
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")  # whole names: fullmatch
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_WATCHER_RE = re.compile(r"(?:v[12]:|any:)?\[?([0-9A-Fa-f.:]+?)\]?:[0-9]+/[0-9]+")
_OPTION_RE = re.compile(r"[a-z_]{1,24}")  # an option's name, shown in an error (fullmatch)


def parse_image_path(path: str) -> tuple[str, str, str | None]:
    """``(pool, image, snapshot)`` of a tgt rbd backing-store path (raises StorageError)."""
    pool, sep, rest = path.partition("/")
    if not sep:
        pool, rest = DEFAULT_POOL, path
    image, at, snapshot = rest.partition("@")
    for kind, name in (("pool", pool), ("image", image)) + (
        (("snapshot", snapshot),) if at else ()
    ):
        if not _NAME_RE.fullmatch(name):
            raise StorageError(
                f"tgtd reports rbd backing store {path!r}: {kind} name "
                f"{name[:64]!r} is not one this tool accepts"
            )
    return pool, image, snapshot if at else None


def parse_bsopts(text: str) -> dict[str, str]:
    """The ``conf``, ``id`` and ``cluster`` options of an rbd ``--bsopts`` string (``;``
    between them); anything else, a relative conf or an odd id raises StorageError (one
    line, never echoing a value that could be a key)."""
    found: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        key, sep, value = item.partition("=")
        if key in ("cephx_key", "virsecretuuid"):
            raise StorageError(
                f"{BSOPTS_ENV}: {key}= is not taken here; name a keyring in "
                "the conf or in RDM_BACKUP_CEPH_KEYRING"
            )
        if not sep or key not in ("conf", "id", "cluster") or key in found:
            # named only when it is an option's name: a pasted key (``AQB…==``) is not echoed
            shown = f", not {key!r}" if _OPTION_RE.fullmatch(key) else ""
            raise StorageError(f"{BSOPTS_ENV}: expected conf=PATH;id=USER{shown}")
        found[key] = value
    if "conf" in found and not os.path.isabs(found["conf"]):
        raise StorageError(f"{BSOPTS_ENV}: conf= must be an absolute path")
    if "id" in found and not _ID_RE.fullmatch(found["id"]):
        raise StorageError(f"{BSOPTS_ENV}: id= is not a cephx user name")
    cluster = found.get("cluster", "ceph")
    if cluster != "ceph" and "conf" not in found:
        raise StorageError(f"{BSOPTS_ENV}: for a cluster other than ceph name its conf= instead")
    return found


def image_source(path: str, bsopts: str | None = None) -> RbdSource:
    """The RBD image of a tgt rbd backing-store ``path``, reached with the client options
    of ``bsopts`` (default: ``RDM_BACKUP_TGT_RBD``)."""
    pool, image, snapshot = parse_image_path(path)
    options = parse_bsopts(os.environ.get(BSOPTS_ENV, "") if bsopts is None else bsopts)
    return RbdSource(
        pool=pool,
        image=image,
        snapshot=snapshot,
        user=options.get("id"),
        config_file=options.get("conf"),
    )


def rbd_lun(source: IscsiSource | None) -> tgt.TgtLun | None:
    """The LUN of the local tgtd at ``source`` when its backing store is rbd, else None."""
    if source is None or not tgt.is_loopback_host(source.host):
        return None
    try:
        if not tgt.tgtadm_available():
            return None
        lun = tgt.find_lun(source.iqn, source.lun)
    except OperationError:
        return None
    if lun is None or lun.backing_store_type != BACKING_STORE or not lun.backing_store_path:
        return None
    return lun


def disk_image(disk: RawDisk) -> RbdSource | None:
    """The RBD image behind an iSCSI disk on a local tgtd's rbd LUN (None: not such a
    disk; StorageError: such a LUN whose backing store or client options are unusable)."""
    lun = rbd_lun(disk.iscsi)
    return None if lun is None else image_source(str(lun.backing_store_path))


def served_problem(handle: Any, image: Any, size: int | None) -> str | None:
    """Why the open ``image`` is not one tgtd serves as a LUN of ``size`` bytes (None: it
    is): another size, or no client but this one holds it open, or none from an address
    of this host, where tgtd runs (another cluster's image of the same name, when
    ``RDM_BACKUP_TGT_RBD`` names another cluster than tgtd's; a LUN tgtd no longer has
    open)."""
    own = int(handle.get_instance_id())
    if size is not None and int(image.size()) != size:
        return f"the image has {int(image.size())} bytes, the LUN {size}"
    others = [str(w.get("addr", "")) for w in image.watchers_list() if int(w["id"]) != own]
    if not others:
        return "no other client has the image open (is it the one tgtd serves?)"
    local = local_addresses()
    if not any(_watcher_host(addr) in local for addr in others):
        return (f"no client on this host has the image open, only {', '.join(others)[:200]} "
                f"(is it the one tgtd serves? {BSOPTS_ENV} may name another cluster)")
    return None


def _watcher_host(addr: str) -> str:
    """The IP address of a watcher's ``[v1:|v2:]IP:PORT/NONCE`` (``""``: not one)."""
    match = _WATCHER_RE.fullmatch(addr)
    try:
        return str(ipaddress.ip_address(match.group(1))) if match else ""
    except ValueError:
        return ""


def local_addresses() -> set[str]:
    """The IPv4 and IPv6 addresses of this host's interfaces (``/proc/net``)."""
    found = {"127.0.0.1", "::1"}
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as stream:
            last = ""
            for line in stream:
                text = line.strip()
                if text.startswith("|--"):
                    last = text[3:].strip()
                elif text == "/32 host LOCAL" and last:
                    found.add(last)
    except OSError:
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as stream:
            for line in stream:
                raw = line.split()[0] if line.split() else ""
                if len(raw) == 32:
                    found.add(str(ipaddress.IPv6Address(int(raw, 16))))
    except (OSError, ValueError):
        pass
    return found


def backing_node(lun: tgt.TgtLun, size: int | None) -> StorageNode:
    """The LUN's RBD image as a mapping node: what the cluster says, or what tgtd says
    with why the cluster could not be asked (``error``)."""
    path = str(lun.backing_store_path)
    what = f"tgt rbd backing store {path}"
    try:
        source = image_source(path)
    except RdmBackupError as err:
        return StorageNode(
            kind="rbd-image",
            name=path,
            size=size,
            identity={"tgt_path": path, "error": err.message},
        )
    try:
        node = image_node(source, what)
    except RdmBackupError as err:
        return StorageNode(
            kind="rbd-image",
            name=source.name,
            path=source.url,
            size=size,
            identity={
                "pool": source.pool,
                "image": source.image,
                "tgt_path": path,
                "error": err.message,
            },
        )
    node.identity["tgt_path"] = path
    return node
