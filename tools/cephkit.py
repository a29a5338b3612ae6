"""The lab's Ceph cluster for tests (``tools/lab.sh ceph-up``): RBD images and RBD disks.

The cluster is found through the config file the lab writes (:data:`CEPH_CONF`); tests
act as ``client.admin`` (its keyring sits beside the config, root-only), test domains
reach their images as ``client.rdmb-lab`` through the lab's libvirt ``ceph`` secret.
Everything a test makes is named ``rdmb*`` and removed afterwards.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from libvirt_rdm_backup.engine import deferred
from tools.labkit import DiskSpec, block_disk, loop_device, make_file, test_domain

CEPH_DIR = Path("/var/lib/rdmb-lab/ceph")
CEPH_CONF = CEPH_DIR / "ceph.conf"
SECRET_UUID_FILE = CEPH_DIR / "secret.uuid"
CLIENT = "rdmb-lab"  # the cephx user of test domains (profile rbd on pool rbd)
POOL = "rbd"
MON_HOST = "127.0.0.1"
MON_PORT = 6789
TIMEOUT = 20
MiB = 1024 * 1024
# What ``rbd create`` gives by default on this release.
DEFAULT_FEATURES = ("layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten")


def unavailable() -> str | None:
    """Why the lab's Ceph cannot be used here (None: it can)."""
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return "python3-rbd/python3-rados are not installed (tools/lab.sh install)"
    if not CEPH_CONF.exists():
        return f"the lab's Ceph cluster is not up ({CEPH_CONF} missing; tools/lab.sh ceph-up)"
    try:
        with cluster():
            pass
    except Exception as err:  # noqa: BLE001 - any failure means: not usable
        return f"the lab's Ceph cluster does not answer: {err}"
    return None


def client_conf(dest: Path, user: str = CLIENT) -> Path:
    """A config file at ``dest`` for ``client.USER`` of the lab's cluster: its monitors and that
    user's keyring (the lab's own conf names the admin keyring for every client)."""
    import configparser

    lab = configparser.ConfigParser(strict=False, interpolation=None)
    lab.read(CEPH_CONF)
    dest.write_text(f"[global]\nmon_host = {lab['global']['mon_host']}\n"
                    f"client_mount_timeout = {TIMEOUT}\n"
                    f"[client.{user}]\nkeyring = {CEPH_DIR / f'ceph.client.{user}.keyring'}\n",
                    encoding="ascii")
    return dest


def secret_uuid() -> str:
    """UUID of the lab's libvirt ``ceph`` secret with client.rdmb-lab's key."""
    return SECRET_UUID_FILE.read_text(encoding="ascii").strip()


@contextlib.contextmanager
def cluster() -> Iterator[Any]:
    """A ``rados.Rados`` connected as client.admin."""
    import rados

    handle = rados.Rados(conffile=str(CEPH_CONF), rados_id="admin",
                         conf={"client_mount_timeout": str(TIMEOUT),
                               "rados_osd_op_timeout": str(TIMEOUT)})
    handle.connect(timeout=TIMEOUT)
    try:
        yield handle
    finally:
        handle.shutdown()


def free_bytes() -> int:
    """Bytes the cluster's OSDs have free (``ceph df``'s AVAIL)."""
    with cluster() as handle:
        return int(handle.get_cluster_stats()["kb_avail"]) * 1024


@contextlib.contextmanager
def ioctx(pool: str = POOL) -> Iterator[Any]:
    """An I/O context on ``pool`` as client.admin."""
    with cluster() as handle:
        ctx = handle.open_ioctx(pool)
        try:
            yield ctx
        finally:
            ctx.close()


@dataclass(frozen=True)
class RbdImage:
    """A test image: ``pool/name`` of ``size`` bytes."""

    pool: str
    name: str
    size: int

    @property
    def spec(self) -> str:
        """``pool/name``."""
        return f"{self.pool}/{self.name}"

    @property
    def qemu_uri(self) -> str:
        """What qemu-img and qemu-io open: ``rbd:pool/name:conf=…:id=admin``."""
        return f"rbd:{self.spec}:conf={CEPH_CONF}:id=admin"


def _feature_mask(names: tuple[str, ...]) -> int:
    import rbd

    table = {"layering": rbd.RBD_FEATURE_LAYERING,
             "exclusive-lock": rbd.RBD_FEATURE_EXCLUSIVE_LOCK,
             "object-map": rbd.RBD_FEATURE_OBJECT_MAP, "fast-diff": rbd.RBD_FEATURE_FAST_DIFF,
             "deep-flatten": rbd.RBD_FEATURE_DEEP_FLATTEN}
    mask = 0
    for name in names:
        mask |= table[name]
    return mask


def remove_image(pool: str, name: str) -> None:
    """Remove an image and its snapshots (gone already is fine), once this process's
    background snapshot removals are done (they hold the image open)."""
    import rbd

    deferred.settle()

    with ioctx(pool) as ctx:
        try:
            with rbd.Image(ctx, name) as image:
                for snap in list(image.list_snaps()):
                    if image.is_protected_snap(snap["name"]):
                        image.unprotect_snap(snap["name"])
                    image.remove_snap(snap["name"])
        except rbd.ImageNotFound:
            return
        rbd.RBD().remove(ctx, name)


@contextlib.contextmanager
def rbd_image(size: int, name: str | None = None, pool: str = POOL,
              features: tuple[str, ...] = DEFAULT_FEATURES,
              object_size: int | None = None) -> Iterator[RbdImage]:
    """Create a thin image named ``rdmb-…`` (unique unless given) and always remove it."""
    import rbd

    name = name or f"rdmb-{uuid.uuid4().hex[:12]}"
    if not name.startswith("rdmb"):
        raise ValueError(f"test images are named rdmb*, not {name!r}")
    order = object_size.bit_length() - 1 if object_size else None
    with ioctx(pool) as ctx:
        rbd.RBD().create(ctx, name, size, order=order, old_format=False,
                         features=_feature_mask(features))
    try:
        yield RbdImage(pool, name, size)
    finally:
        remove_image(pool, name)


def write_pattern(image: RbdImage, offset: int, length: int, pattern: int) -> None:
    """Write ``length`` bytes of ``pattern`` at ``offset`` (through qemu-io: QEMU's rbd driver)."""
    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} {length}",
                    image.qemu_uri], check=True, capture_output=True, timeout=300)


def export(image: RbdImage, dest: Path, snapshot: str | None = None) -> Path:
    """Copy the image (or a snapshot of it) into a raw file with qemu-img."""
    source = f"rbd:{image.spec}" + (f"@{snapshot}" if snapshot else "") + \
        f":conf={CEPH_CONF}:id=admin"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", source, str(dest)],
                   check=True, capture_output=True, timeout=600)
    return dest


def rbd_disk(target: str, image: RbdImage, user: str = CLIENT, secret: str | None = None,
             host: str = MON_HOST, port: int = MON_PORT, bus: str = "virtio") -> DiskSpec:
    """A ``<disk type='network'>`` RBD disk with cephx auth through a libvirt ``ceph`` secret
    (default: the lab's)."""
    return DiskSpec(
        target,
        (
            "<disk type='network' device='disk'>"
            "<driver name='qemu' type='raw' cache='none'/>"
            f"<source protocol='rbd' name={quoteattr(image.spec)}>"
            f"<host name={quoteattr(host)} port='{port}'/></source>"
            f"<auth username={quoteattr(user)}>"
            f"<secret type='ceph' uuid={quoteattr(secret or secret_uuid())}/></auth>"
            f"<target dev='{target}' bus='{bus}'/></disk>"
        ),
    )


def snapshots(image: RbdImage) -> list[str]:
    """Names of the image's snapshots (what ``rbd snap ls`` lists), sorted, once this
    process's background removals of superseded snapshots are done."""
    import rbd

    deferred.settle()

    with ioctx(image.pool) as ctx, rbd.Image(ctx, image.name, read_only=True) as opened:
        return sorted(str(s["name"]) for s in opened.list_snaps())


def create_snapshot(image: RbdImage, name: str) -> None:
    """Snapshot the image (``rbd snap create``)."""
    import rbd

    with ioctx(image.pool) as ctx, rbd.Image(ctx, image.name) as opened:
        opened.create_snap(name)


def remove_snapshot(image: RbdImage, name: str) -> None:
    """Remove one snapshot of the image (``rbd snap rm``)."""
    import rbd

    with ioctx(image.pool) as ctx, rbd.Image(ctx, image.name) as opened:
        opened.remove_snap(name)


@dataclass
class RbdLoopVM:
    """A firmware-only domain: vdb on an RBD image, vdc on a loop device over a file."""

    dom: Any  # libvirt.virDomain
    image: RbdImage
    loop_file: Path
    work: Path

    @property
    def name(self) -> str:
        return str(self.dom.name())


@contextlib.contextmanager
def rbd_and_loop_vm(name: str, work: Path, rbd_size: int, loop_size: int,
                    data: int, extra: tuple[DiskSpec, ...] = ()) -> Iterator[RbdLoopVM]:
    """:class:`RbdLoopVM` named ``name`` (with the ``extra`` disks too), its image holding
    ``data`` bytes of 0x11 first; the domain, loop device and image are removed afterwards."""
    loop_file = make_file(work / "loop-lun.img", loop_size)
    with rbd_image(rbd_size) as image, loop_device(loop_file) as loop:
        write_pattern(image, 0, data, 0x11)
        disks = [rbd_disk("vdb", image), block_disk("vdc", loop), *extra]
        with test_domain(name, disks) as dom:
            yield RbdLoopVM(dom, image, loop_file, work)


def references(vm: RbdLoopVM, index: int) -> dict[str, Path]:
    """The disks' bytes now (guest paused while they are read)."""
    vm.dom.suspend()
    try:
        rbd_ref = export(vm.image, vm.work / f"ref-{index}-vdb.raw")
        loop_ref = vm.work / f"ref-{index}-vdc.raw"
        loop_ref.write_bytes(vm.loop_file.read_bytes())
    finally:
        vm.dom.resume()
    return {"vdb": rbd_ref, "vdc": loop_ref}
