"""Ceph RBD images through librbd and librados (Debian's ``python3-rbd``/``python3-rados``).

This is the only module that imports the bindings. The import is guarded: the
package works without them, and an RBD disk on such a host fails with one line
(:func:`require`).

Credentials: the cephx key of the disk's libvirt ``ceph`` secret, which the
engine reads with ``virSecretGetValue`` and hands over with :func:`remember_key`
(kept in this process's memory only), or a keyring file the administrator names
in ``RDM_BACKUP_CEPH_KEYRING`` (root-owned, not readable by others). Keys reach
librados as in-memory configuration options: never in argv, files, logs or
error lines.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from libvirt_rdm_backup.domain.disks import RbdSource
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.process import env_seconds

try:
    import rados as rados  # re-exported: the agents catch its errors
    import rbd as rbd

    HAVE_RBD = True
except ImportError:  # pragma: no cover - depends on the host
    rados = rbd = None
    HAVE_RBD = False

KEYRING_ENV = "RDM_BACKUP_CEPH_KEYRING"
TIMEOUT_ENV = "RDM_BACKUP_CEPH_TIMEOUT"
DEFAULT_TIMEOUT = 20.0  # seconds for connecting and for each monitor or OSD request
DEFAULT_MON_PORT = 6789
INSTALL_HINT = "Debian: apt-get install python3-rbd python3-rados"


def timeout() -> float:
    """Seconds for connecting and for each monitor or OSD request
    (``RDM_BACKUP_CEPH_TIMEOUT``)."""
    return env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)


def client_conf_options() -> dict[str, str]:
    """Quiet, bounded clients: librados would otherwise wait 300 s for an unreachable
    monitor."""
    limit = f"{timeout():g}"
    return {"client_mount_timeout": limit, "rados_mon_op_timeout": limit,
            "rados_osd_op_timeout": limit, "log_to_stderr": "false",
            "err_to_stderr": "false", "log_to_file": "false"}
_FEATURES = (
    ("layering", "RBD_FEATURE_LAYERING"), ("striping", "RBD_FEATURE_STRIPINGV2"),
    ("exclusive-lock", "RBD_FEATURE_EXCLUSIVE_LOCK"), ("object-map", "RBD_FEATURE_OBJECT_MAP"),
    ("fast-diff", "RBD_FEATURE_FAST_DIFF"), ("deep-flatten", "RBD_FEATURE_DEEP_FLATTEN"),
    ("journaling", "RBD_FEATURE_JOURNALING"), ("data-pool", "RBD_FEATURE_DATA_POOL"),
    ("migrating", "RBD_FEATURE_MIGRATING"), ("non-primary", "RBD_FEATURE_NON_PRIMARY"),
)

_KEYS: dict[str, str] = {}  # libvirt secret reference -> base64 cephx key (this process only)
# A cluster that did not answer is not asked again for a while: one command meets each
# unreachable cluster once, not once per question (size, then mapping) at the timeout each.
UNREACHABLE_MEMORY = 60.0
_UNREACHABLE: dict[tuple[Any, ...], tuple[float, str]] = {}


def require(what: str) -> None:
    """Raise StorageError (one line, naming ``what``) when the bindings are missing."""
    if not HAVE_RBD:
        raise StorageError(f"{what} is a Ceph RBD image, and this host lacks librbd's Python "
                           f"bindings ({INSTALL_HINT})")


def secret_ref(source: RbdSource) -> str | None:
    """The libvirt secret a source names (``uuid:…`` or ``usage:…``), or None."""
    if source.secret_uuid:
        return f"uuid:{source.secret_uuid.lower()}"
    if source.secret_usage:
        return f"usage:{source.secret_usage}"
    return None


def remember_key(source: RbdSource, value: bytes) -> None:
    """Keep the raw value of the source's libvirt secret (a cephx key) for this process."""
    ref = secret_ref(source)
    if ref is not None and value:
        _KEYS[ref] = base64.b64encode(value).decode("ascii")


def knows_key(source: RbdSource) -> bool:
    """True when :func:`remember_key` was given the key of the source's secret."""
    ref = secret_ref(source)
    return ref is not None and ref in _KEYS


def forget_keys() -> None:
    """Drop every remembered key."""
    _KEYS.clear()


def check_keyring_file(path: str) -> None:
    """Refuse a keyring file that is missing, not a regular file, or readable by others."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise StorageError(f"{KEYRING_ENV}: cannot use {path}: {err.strerror}") from err
    if not stat.S_ISREG(info.st_mode):
        raise StorageError(f"{KEYRING_ENV}: {path} is not a regular file")
    if info.st_mode & 0o077 or info.st_uid not in (0, os.geteuid()):
        raise StorageError(f"{KEYRING_ENV}: {path} must belong to root (or this user) and be "
                           "readable by its owner only (chmod 600)")


def monitor_hosts(source: RbdSource) -> str | None:
    """``mon_host`` for librados from the disk's ``<host>`` elements (None: none given)."""
    found = []
    for host, port in source.hosts:
        name = f"[{host}]" if ":" in host and not host.startswith("[") else host
        found.append(f"{name}:{port or DEFAULT_MON_PORT}")
    return ",".join(found) or None


def client_conf(source: RbdSource, what: str) -> tuple[str | None, dict[str, str]]:
    """The config file (None: none; ``""``: Ceph's default search) and in-memory options
    with which librados reaches the source's cluster as its user."""
    conf = client_conf_options()
    hosts = monitor_hosts(source)
    if hosts:
        conf["mon_host"] = hosts
    ref = secret_ref(source)
    keyring = os.environ.get(KEYRING_ENV)
    if ref is not None and ref in _KEYS:
        conf["key"] = _KEYS[ref]
    elif keyring:
        check_keyring_file(keyring)
        conf["keyring"] = keyring
    elif ref is not None:
        raise StorageError(
            f"{what}: no cephx key for client.{source.user or 'admin'}: libvirt does not reveal "
            f"its secret ({ref}; a private secret?); name a keyring file in {KEYRING_ENV}")
    conffile = source.config_file or (None if hosts else "")
    return conffile, conf


def keyring_key(path: str, user: str) -> str:
    """The ``key`` of ``[client.USER]`` in a keyring file (checked: private, regular)."""
    check_keyring_file(path)
    section = None
    try:
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                text = line.strip()
                if text.startswith("[") and text.endswith("]"):
                    section = text[1:-1].strip()
                elif section == f"client.{user}" and text.partition("=")[0].strip() == "key":
                    return _checked_key(text.partition("=")[2].strip(), path, user)
    except (OSError, UnicodeDecodeError) as err:
        raise StorageError(f"{KEYRING_ENV}: cannot read {path}") from err
    raise StorageError(f"{KEYRING_ENV}: {path} holds no key of client.{user}")


def _checked_key(value: str, path: str, user: str) -> str:
    """``value`` when it is base64 (what librados, QEMU's secret objects and the memory
    files that carry it take); else StorageError, which never repeats it."""
    try:
        if value.isascii() and base64.b64decode(value, validate=True):
            return value
    except ValueError:
        pass
    raise StorageError(f"{KEYRING_ENV}: the key of client.{user} in {path} is not base64")


def cephx_key(source: RbdSource, what: str) -> str | None:
    """The base64 cephx key of the source's user: its libvirt secret's, else the one in
    ``RDM_BACKUP_CEPH_KEYRING``; None when the disk names no secret and no keyring is
    given (Ceph's own configuration then applies). Raises StorageError when a named
    secret's value is unknown and no keyring is given."""
    ref = secret_ref(source)
    if ref is not None and ref in _KEYS:
        return _KEYS[ref]
    keyring = os.environ.get(KEYRING_ENV)
    if keyring:
        return keyring_key(keyring, source.user or "admin")
    client_conf(source, what)  # raises for a secret whose value libvirt did not reveal
    return None


def qemu_blockdev(source: RbdSource, secret_id: str | None) -> dict[str, Any]:
    """Options of QEMU's ``rbd`` protocol node for the source (``key-secret``: the QEMU
    ``secret`` object holding the key, when there is one)."""
    node: dict[str, Any] = {"driver": "rbd", "pool": source.pool, "image": source.image}
    if source.namespace:
        node["namespace"] = source.namespace
    if source.snapshot:
        node["snapshot"] = source.snapshot
    if source.config_file:
        node["conf"] = source.config_file
    if source.user:
        node["user"] = source.user
    if source.hosts:
        node["server"] = [{"host": host, "port": str(port or DEFAULT_MON_PORT)}
                          for host, port in source.hosts]
    if secret_id is not None:
        node["key-secret"] = secret_id
        node["auth-client-required"] = ["cephx"]
    return node


@dataclass
class ImageFacts:
    """Who an RBD image is, as its cluster says (what a restore elsewhere needs)."""

    cluster_fsid: str
    monitors: list[str]
    pool: str
    pool_id: int
    namespace: str | None
    image: str
    image_id: str
    size: int
    object_size: int
    order: int
    features: list[str]
    features_mask: int
    block_name_prefix: str
    data_pool_id: int
    stripe_unit: int
    stripe_count: int
    snapshot: str | None = None
    parent: dict[str, Any] | None = None
    snapshots: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the ``identity`` of the mapping's ``rbd-image`` node)."""
        return asdict(self)


def feature_names(mask: int) -> list[str]:
    """Names of the RBD feature bits set in ``mask`` (unknown bits as ``bit-N``)."""
    names, known = [], 0
    for name, constant in _FEATURES:
        bit = int(getattr(rbd, constant, 0)) if HAVE_RBD else 0
        known |= bit
        if bit and mask & bit:
            names.append(name)
    names += [f"bit-{n}" for n in range(64) if mask & ~known & (1 << n)]
    return names


def _error(what: str, err: Exception) -> StorageError:
    return StorageError(f"{what}: {type(err).__name__}: {str(err)[:200]}")


def _connect(source: RbdSource, what: str) -> Any:
    """A new connected ``rados.Rados`` for the source's cluster and user."""
    require(what)
    conffile, conf = client_conf(source, what)
    where = (source.hosts, source.config_file, source.user)
    failed = _UNREACHABLE.get(where)
    if failed is not None and time.monotonic() - failed[0] < UNREACHABLE_MEMORY:
        raise StorageError(f"{what}: cannot connect to the Ceph cluster: {failed[1]}")
    try:
        handle = rados.Rados(rados_id=source.user or "admin", conffile=conffile, conf=conf)
    except rados.Error as err:
        raise _error(f"{what}: cannot configure the Ceph client", err) from err
    try:
        handle.connect(timeout=timeout())
    except rados.Error as err:
        handle.shutdown()
        if isinstance(err, rados.TimedOut):
            _UNREACHABLE[where] = (time.monotonic(), f"{type(err).__name__}: {str(err)[:200]}")
        raise _error(f"{what}: cannot connect to the Ceph cluster", err) from err
    _UNREACHABLE.pop(where, None)
    return handle


@contextmanager
def cluster(source: RbdSource, what: str, shared: bool = False) -> Iterator[Any]:
    """A connected ``rados.Rados`` for the source's cluster and user, shut down after; a
    ``shared`` one stays connected for this process's later calls (:func:`close_shared`)."""
    if not shared:
        handle = _connect(source, what)
        try:
            yield handle
        finally:
            handle.shutdown()
        return
    require(what)
    client_conf(source, what)  # the credentials checked again on every use
    where = (source.hosts, source.config_file, source.user, secret_ref(source),
             os.environ.get(KEYRING_ENV), os.getpid())
    with _SHARED_LOCK:  # threads share it too (snapshots removed in the background)
        handle = _SHARED.get(where)
        if handle is None:
            handle = _SHARED[where] = _connect(source, what)
    try:
        yield handle
    except rados.Error:
        with _SHARED_LOCK:  # reconnect next time; shut down at exit (another thread may
            if _SHARED.get(where) is handle:  # still use it)
                _RETIRED.append(_SHARED.pop(where))
        raise


_SHARED: dict[tuple[Any, ...], Any] = {}
_RETIRED: list[Any] = []
_SHARED_LOCK = threading.Lock()


@atexit.register
def close_shared() -> None:
    """Shut down the shared connections of this process."""
    with _SHARED_LOCK:
        handles = [*_SHARED.values(), *_RETIRED]
        _SHARED.clear()
        _RETIRED.clear()
    for handle in handles:
        handle.shutdown()


@contextmanager
def open_image(source: RbdSource, what: str, writable: bool = False,
               shared: bool = False) -> Iterator[tuple[Any, Any, Any]]:
    """``(cluster, ioctx, image)`` of the source, the image opened read-only unless
    ``writable`` (snapshots are made and removed through a writable one), through a
    ``shared`` connection (:func:`cluster`) or a new one."""
    with cluster(source, what, shared) as handle:
        try:
            ioctx = handle.open_ioctx(source.pool)
        except rados.Error as err:
            raise _error(f"{what}: cannot open pool {source.pool}", err) from err
        try:
            if source.namespace:
                ioctx.set_namespace(source.namespace)
            image = rbd.Image(ioctx, source.image, snapshot=source.snapshot,
                              read_only=not writable)
        except (rados.Error, rbd.Error) as err:
            ioctx.close()
            raise _error(f"{what}: cannot open RBD image {source.name}", err) from err
        try:
            yield handle, ioctx, image
        finally:
            image.close()
            ioctx.close()


def monitors(handle: Any) -> list[str]:
    """The cluster's monitors (``v2:addr,v1:addr`` each) from ``mon dump``."""
    ret, out, _ = handle.mon_command('{"prefix": "mon dump", "format": "json"}', b"",
                                     timeout=timeout())
    if ret != 0:
        return []
    try:
        mons = json.loads(out)["mons"]
        return [",".join(f"{a['type']}:{a['addr']}" for a in m["public_addrs"]["addrvec"])
                for m in mons]
    except (ValueError, KeyError, TypeError):
        return []


def image_facts(source: RbdSource, what: str) -> ImageFacts:
    """Everything the cluster says about the source's image (raises StorageError)."""
    with open_image(source, what, shared=True) as (handle, ioctx, image):
        try:
            info = image.stat()
            mask = int(image.features())
            parent = None
            try:
                spec = image.get_parent_image_spec()
                parent = {"pool": spec["pool_name"], "namespace": spec["pool_namespace"] or None,
                          "image": spec["image_name"], "snapshot": spec["snap_name"]}
            except rbd.ImageNotFound:
                parent = None
            return ImageFacts(
                cluster_fsid=str(handle.get_fsid()),
                monitors=monitors(handle),
                pool=source.pool,
                pool_id=int(handle.pool_lookup(source.pool)),
                namespace=source.namespace,
                image=source.image,
                image_id=str(image.id()),
                size=int(info["size"]),
                object_size=int(info["obj_size"]),
                order=int(info["order"]),
                features=feature_names(mask),
                features_mask=mask,
                block_name_prefix=str(image.block_name_prefix()),
                data_pool_id=int(image.data_pool_id()),
                stripe_unit=int(image.stripe_unit()),
                stripe_count=int(image.stripe_count()),
                snapshot=source.snapshot,
                parent=parent,
                snapshots=[{"id": int(s["id"]), "name": str(s["name"]), "size": int(s["size"])}
                           for s in image.list_snaps()],
            )
        except (rados.Error, rbd.Error) as err:
            raise _error(f"{what}: cannot read RBD image {source.name}", err) from err


def image_size(source: RbdSource, what: str) -> int:
    """Size in bytes of the source's image (or snapshot)."""
    with open_image(source, what, shared=True) as (_, _, image):
        try:
            return int(image.size())
        except rbd.Error as err:
            raise _error(f"{what}: cannot read RBD image {source.name}", err) from err
