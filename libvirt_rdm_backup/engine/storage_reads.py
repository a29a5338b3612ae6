"""Reading a raw disk from its storage (a shut-off domain's disk, a passthrough LUN, an RBD
snapshot): what QEMU opens for it, a host device, an iSCSI LUN or a Ceph RBD image.

An RBD image is opened by QEMU's rbd driver as the disk's cephx user. Its key reaches
QEMU as a ``secret`` object: over QMP to the private ``qemu-storage-daemon`` of a copy
(redacted in debug logs), or through an inherited pipe to ``qemu-nbd``; never in argv.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource
from libvirt_rdm_backup.qemu.block_copy import Endpoint, raw_source
from libvirt_rdm_backup.qemu.layers import option_value
from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server
from libvirt_rdm_backup.storage import rbd
from libvirt_rdm_backup.storage.snapshots import Presented


def raw_source_opts(presented: Presented, size: int) -> str:
    """``--image-opts`` of ``qemu-nbd`` for reading ``size`` bytes at ``presented.offset`` of a
    raw source (a resync reads it through NBD)."""
    if presented.source.startswith("iscsi://"):
        portal, _, rest = presented.source.removeprefix("iscsi://").partition("/")
        target, _, lun = rest.rpartition("/")
        inner = (f"file.driver=iscsi,file.transport=tcp,file.portal={portal},"
                 f"file.target={target},file.lun={lun}")
    elif presented.source.startswith("/dev/"):
        inner = f"file.driver=host_device,file.filename={option_value(presented.source)}"
    else:
        inner = f"file.driver=file,file.filename={option_value(presented.source)}"
    return f"driver=raw,offset={presented.offset},size={size},{inner}"


def _secret_id() -> str:
    return f"rdmb-key-{uuid.uuid4().hex[:12]}"


def storage_endpoint(disk: RawDisk, size: int) -> Endpoint:
    """The disk's bytes as the source of a copy (``size`` bytes from its start)."""
    if disk.rbd is None:
        return Endpoint(raw_source(disk.source, size=size))
    return rbd_endpoint(disk.rbd, size, f"disk {disk.target}")


def rbd_endpoint(source: RbdSource, size: int, what: str) -> Endpoint:
    """An RBD image (or its ``snapshot``) as the source of a copy, through QEMU's rbd driver
    as the image's cephx user."""
    rbd.require(what)
    key = rbd.cephx_key(source, what)
    secret = _secret_id() if key else None
    node = {"driver": "raw", "size": size, "file": rbd.qemu_blockdev(source, secret)}
    objects = ({"qom-type": "secret", "id": secret, "data": key, "format": "base64"},) \
        if key and secret else ()
    return Endpoint(node, objects)


def image_opts(options: dict[str, Any], prefix: str = "") -> list[str]:
    """Blockdev options as ``key=value`` pairs of an ``--image-opts`` string (nested
    objects and lists dotted: ``file.server.0.host=…``)."""
    pairs: list[str] = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            pairs += image_opts(value, f"{name}.")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    pairs += image_opts(item, f"{name}.{index}.")
                else:
                    pairs.append(f"{name}.{index}={option_value(str(item))}")
        elif isinstance(value, bool):
            pairs.append(f"{name}={'on' if value else 'off'}")
        else:
            pairs.append(f"{name}={option_value(str(value))}")
    return pairs


@contextmanager
def storage_nbd(disk: RawDisk) -> Iterator[str]:
    """The disk read from its storage, served read-only by ``qemu-nbd``; yields its NBD URI."""
    if disk.rbd is None:
        with qemu_nbd_server(disk.source, "raw", readonly=True) as uri:
            yield uri
        return
    with rbd_nbd(disk.rbd, f"disk {disk.target}") as uri:
        yield uri


@contextmanager
def rbd_nbd(source: RbdSource, what: str) -> Iterator[str]:
    """An RBD image (or its ``snapshot``) served read-only by ``qemu-nbd``; yields its NBD
    URI. The key reaches ``qemu-nbd`` through an inherited pipe."""
    rbd.require(what)
    key = rbd.cephx_key(source, what)
    if not key:
        opts = ",".join(image_opts({"driver": "raw", "file": rbd.qemu_blockdev(source, None)}))
        with qemu_nbd_server(opts, None, readonly=True, extra=["--image-opts"]) as uri:
            yield uri
        return
    secret = _secret_id()
    opts = ",".join(image_opts({"driver": "raw", "file": rbd.qemu_blockdev(source, secret)}))
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, key.encode("ascii"))  # a few dozen bytes: the pipe holds them
        os.close(write_end)
        write_end = -1
        extra = ["--object", f"secret,id={secret},format=base64,file=/dev/fd/{read_end}",
                 "--image-opts"]
        with qemu_nbd_server(opts, None, readonly=True, extra=extra,
                             pass_fds=(read_end,)) as uri:
            yield uri
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
