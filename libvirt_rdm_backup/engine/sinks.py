"""Where a backup writes each disk's new layer: a file in staging, or a region of an NBD volume.

Each store opens its own kind of session (:meth:`.stores.Store.session`). What a
capture asks of it (:class:`Sink`): create a disk's empty layer, attach it to the
running QEMU as a writable node (for the guest's block jobs), give it as the
target of a copy from storage (a block job of a private storage daemon), and name it
as a ``qemu-img`` filename (for the checks after the copy). What the backup asks afterwards
(:class:`Session`): the written layer, checked and described; its digest; and,
last, to publish the manifest.
"""

from __future__ import annotations

import contextvars
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.errors import OperationError, QmpError, RdmBackupError, VerificationError
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.block_copy import Endpoint
from libvirt_rdm_backup.qemu.blockdev import added_target_node, attached_image
from libvirt_rdm_backup.qemu.jobs import COPY_CHUNK
from libvirt_rdm_backup.qemu.layer_format import PLAIN, LayerFormat
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.qemu.secrets import LayerKey, active_secret, guest_secret
from libvirt_rdm_backup.repository.digest import Digest, file_digest
from libvirt_rdm_backup.repository.encryption import EncryptionRecord, write_record
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.store import Repository, Staging
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_format import region_size

DATA_FORMAT = "qcow2"
LUKS_ROOM = 4 << 20  # more room in a volume region for the LUKS header of an encrypted layer
CREATE_AT_ONCE = 8  # encrypted layers created side by side (each a qemu-img process)


class Sink(Protocol):
    """Destination of the new layers of one backup, as a capture writes them."""

    local_files: bool  # layers are local files (resyncs and chunk-compared ranges need that)
    layer_format: LayerFormat  # how new layers are written (compressed or not)
    copy_chunk: int  # the largest request a backup job writes (at least the target's cluster)

    def create(self, plan: DiskPlan) -> None:
        """Create the disk's empty layer (qcow2 of the disk's size)."""
        ...

    def attach(self, monitor: Monitor, plan: DiskPlan) -> AbstractContextManager[str]:
        """Attach the created layer to QEMU; yields the node name."""
        ...

    def target(self, plan: DiskPlan) -> str:
        """The layer as a ``qemu-img`` filename (a path, or a ``json:`` filename)."""
        ...

    def copy_target(self, plan: DiskPlan) -> Endpoint:
        """The created layer as the target of a copy (:mod:`~..qemu.block_copy`)."""
        ...

    def scratch(self, name: str) -> str:
        """A local path for a temporary file of this backup."""
        ...


@dataclass(frozen=True)
class LocalLayer:
    """A new layer that is a local file: a chunk map is computed from it and kept beside it."""

    path: str
    lower: list[str]  # the layers it builds on, top first, checked
    chunk_map_path: str


@dataclass(frozen=True)
class Written:
    """A disk's new layer once written, checked: what its record says of it."""

    image: str  # the layer alone (its own clusters) as a ``qemu-img`` filename
    data_file: str
    stored_bytes: int
    file_size: int | None = None
    backing_file: str | None = None
    location: dict[str, Any] | None = None
    local: LocalLayer | None = None
    own_bytes: int | None = None  # data the layer holds, when the store tells (no map read)


class Session(Sink, Protocol):
    """The sink of one backup in one store, which also publishes it."""

    def written(self, plan: DiskPlan) -> Written:
        """The disk's layer after its copy, checked (raises VerificationError)."""
        ...

    def digest(self, plan: DiskPlan) -> Digest:
        """The digest of the disk's stored layer (after :meth:`written`)."""
        ...

    def publish(self, manifest: Manifest) -> str:
        """Make the backup visible; returns where it is."""
        ...


def create_layers(sink: Sink, plans: list[DiskPlan]) -> None:
    """Create the empty layers of ``plans``; encrypted ones side by side (QEMU's LUKS
    setup of each takes seconds of CPU, whatever else the backup does)."""
    if len(plans) < 2 or not sink.layer_format.encrypted:
        for plan in plans:
            sink.create(plan)
        return
    with ThreadPoolExecutor(min(len(plans), CREATE_AT_ONCE)) as pool:
        # each in a copy of this context: qemu-img gets the key's secret object from it
        futures = [pool.submit(contextvars.copy_context().run, sink.create, plan)
                   for plan in plans]
        for future in futures:
            future.result()


def data_file_name(plan: DiskPlan) -> str:
    """File name of a disk's data inside a backup."""
    return f"{plan.disk.target}.{DATA_FORMAT}"


class FileSink:
    """Layers as qcow2 files in the staging directory of a file repository."""

    local_files = True
    copy_chunk = COPY_CHUNK

    def __init__(self, repo: Repository, staging: Staging,
                 lower: Callable[[DiskPlan], list[str]],
                 layer_format: LayerFormat = PLAIN, key: LayerKey | None = None,
                 objects: tuple[dict[str, Any], ...] = (),
                 encryption: EncryptionRecord | None = None) -> None:
        self.repo = repo
        self.staging = staging
        self._lower = lower
        self.layer_format = layer_format
        self._key = key  # for the guest's QEMU, when new layers are encrypted
        self._objects = objects  # the key's secret object, for a private daemon
        self._encryption = encryption  # the repository's record, written at the publish

    def target(self, plan: DiskPlan) -> str:
        return self.staging.file(data_file_name(plan))

    def scratch(self, name: str) -> str:
        return self.staging.file(name)

    def create(self, plan: DiskPlan) -> None:
        backing = plan.parent.relative_data_file() if plan.parent else None
        # qemu-img create: a header written in one step, no block node to open
        img.create(self.target(plan), DATA_FORMAT, int(plan.disk.size or 0), backing=backing,
                   options=self.layer_format.create_options())

    def copy_target(self, plan: DiskPlan) -> Endpoint:
        # the staging file is this run's own: opened by name; any backing named in the
        # header is not opened (a copy writes every byte of the disk)
        return Endpoint(self.layer_format.writer(self.layer_format.layer(
            {"driver": DATA_FORMAT, "backing": None,
             "file": {"driver": "file", "filename": self.target(plan)}})),
            objects=self._objects if self.layer_format.encrypted else ())

    def attach(self, monitor: Monitor, plan: DiskPlan) -> AbstractContextManager[str]:
        key = self._key if self.layer_format.encrypted else None
        return _file_node(monitor, self.target(plan), plan, key)

    def written(self, plan: DiskPlan) -> Written:
        path = self.target(plan)
        stat = os.stat(path)
        return Written(
            image=layers.json_filename(layers.file_chain([path])),
            data_file=os.path.basename(path),
            stored_bytes=stat.st_blocks * 512,
            file_size=stat.st_size,
            backing_file=plan.parent.relative_data_file() if plan.parent else None,
            local=LocalLayer(path, self._lower(plan),
                             self.staging.file(f"{plan.disk.target}.chunks")),
        )

    def digest(self, plan: DiskPlan) -> Digest:
        return file_digest(self.target(plan))

    def publish(self, manifest: Manifest) -> str:
        if self.layer_format.encrypted and self._encryption is not None:
            write_record(self.repo.root, self._encryption)  # the first encrypted backup's
        return self.repo.publish(self.staging, manifest)


@contextmanager
def _file_node(monitor: Monitor, path: str, plan: DiskPlan, key: LayerKey | None
               ) -> Iterator[str]:
    """The layer file as a node of the guest's QEMU (with the key's secret object there
    when the layer is encrypted)."""
    options: dict[str, Any] = {"backing": None} if plan.parent else {}
    with ExitStack() as stack:
        if key is not None:
            secret = stack.enter_context(guest_secret(monitor, key,
                                                      object_name("key", plan.disk.target)))
            options["encrypt"] = layers.encrypt_options(secret)
        node = stack.enter_context(attached_image(monitor, path, DATA_FORMAT,
                                                  plan.disk.target, options or None))
        yield node.node_name


class NbdSink:
    """Layers as qcow2 images in fresh regions of an NBD volume."""

    local_files = False
    copy_chunk = COPY_CHUNK

    def __init__(self, volume: NbdVolume, scratch_dir: str,
                 layer_format: LayerFormat = PLAIN, key: LayerKey | None = None) -> None:
        self.volume = volume
        self.scratch_dir = scratch_dir
        self.layer_format = layer_format
        self._key = key  # for the QEMUs that write encrypted layers
        self.locations: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # layers may be created side by side

    def scratch(self, name: str) -> str:
        return os.path.join(self.scratch_dir, name)

    def create(self, plan: DiskPlan) -> None:
        """Reserve a region and write an empty qcow2 header into it (a few KiB)."""
        size = int(plan.disk.size or 0)
        region = region_size(size) + (LUKS_ROOM if self.layer_format.encrypted else 0)
        with tempfile.TemporaryDirectory(prefix="rdmb-layer-") as tmp:
            empty = os.path.join(tmp, "empty.qcow2")
            # qemu-img create: just the header bytes
            img.create(empty, DATA_FORMAT, size, options=self.layer_format.create_options())
            with open(empty, "rb") as stream:
                header = stream.read()
        with self._lock:  # one NBD connection to the volume
            offset = self.volume.allocate(region)
            self.volume.write(offset, header)
            self.volume.flush()
            self.locations[plan.disk.target] = {"offset": offset, "region": region}

    def node(self, plan: DiskPlan) -> dict[str, Any]:
        """Blockdev options of the disk's layer (qcow2 on its region of the export)."""
        location = self.locations[plan.disk.target]
        return layers.chain_node([self.volume.region_node(location["offset"],
                                                          location["region"])],
                                 [self.layer_format.encrypted])

    def target(self, plan: DiskPlan) -> str:
        return layers.json_filename(self.node(plan))

    def copy_target(self, plan: DiskPlan) -> Endpoint:
        tls = self.volume.tls_object()
        secret = active_secret() if self.layer_format.encrypted else None
        return Endpoint(self.layer_format.writer(self.node(plan)),
                        objects=tuple(o for o in (tls, secret) if o is not None))

    def attach(self, monitor: Monitor, plan: DiskPlan) -> AbstractContextManager[str]:
        key = self._key if self.layer_format.encrypted else None
        return _nbd_node(monitor, self.node(plan), plan, self.volume.tls_object(),
                         self.volume.address.socket, key)

    def written(self, plan: DiskPlan) -> Written:
        image = self.read_back(plan)
        location = self.locations[plan.disk.target]
        location["length"] = img.check_end(image, DATA_FORMAT)
        return Written(image=image, data_file=data_file_name(plan),
                       stored_bytes=location["length"], location=dict(location))

    def read_back(self, plan: DiskPlan) -> str:
        """The new layer as a ``qemu-img`` filename: its header read from the server and
        checked, then pinned (the server cannot show the later reads another header)."""
        location = self.locations[plan.disk.target]
        offset, region = int(location["offset"]), int(location["region"])
        head = self.volume.read(offset, layers.HEADER_READ)
        encrypted = self.layer_format.encrypted
        problem = layers.header_problem(head, None, int(plan.disk.size or 0), encrypted)
        if problem is not None:
            raise VerificationError(f"the new layer of {plan.disk.target} in "
                                    f"{self.volume.address.uri} {problem} after it was written; "
                                    "nothing was published")
        node = layers.pinned_head(head, self.volume.region_node(offset, region), region,
                                  self.scratch(f"new-{offset}.qcow2"))
        return layers.json_filename(layers.chain_node([node], [encrypted]))

    def digest(self, plan: DiskPlan) -> Digest:
        location = self.locations[plan.disk.target]
        return self.volume.digest(int(location["offset"]), int(location["length"]))

    def publish(self, manifest: Manifest) -> str:
        self.volume.publish(manifest)
        return f"{self.volume.address.uri}#{manifest.backup_id}"


def _pass_connection(monitor: Monitor, socket_path: str, name: str) -> dict[str, Any]:
    """Connect to a unix-socket NBD server here and hand the connection to QEMU.

    QEMU runs as its own user and may not open the server's socket; a connection
    made by this process and passed with ``getfd`` needs no access for it.
    """
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
        monitor.execute("getfd", {"fdname": name}, files=[conn.fileno()])
    except OSError as err:
        raise OperationError(f"cannot connect to NBD socket {socket_path}: {err.strerror}"
                             ) from err
    finally:
        conn.close()
    return {"type": "fd", "str": name}


@contextmanager
def _nbd_node(monitor: Monitor, options: dict[str, Any], plan: DiskPlan,
              tls: dict[str, Any] | None, socket_path: str | None,
              key: LayerKey | None = None) -> Iterator[str]:
    """The layer's node in QEMU (with the TLS credentials object its NBD client needs, and
    the key's secret object when the layer is encrypted)."""
    if key is not None:
        with guest_secret(monitor, key, object_name("key", plan.disk.target)) as secret:
            options = {**options, "encrypt": layers.encrypt_options(secret)}
            with _nbd_node(monitor, options, plan, tls, socket_path) as name:
                yield name
        return
    if socket_path is not None:
        fdname = object_name("nbdconn", plan.disk.target)
        server = _pass_connection(monitor, socket_path, fdname)
        options = {**options, "file": {**options["file"],
                                       "file": {**options["file"]["file"], "server": server}}}
    created = False
    if tls is not None:
        try:
            monitor.execute("object-add", tls)
            created = True
        except QmpError as err:
            if "duplicate" not in err.desc.lower() and "exists" not in err.desc.lower():
                raise
    name = object_name("target", plan.disk.target)
    try:
        with added_target_node(monitor, options, name):
            yield name
    finally:
        if created and tls is not None:
            with suppress(RdmBackupError):
                monitor.execute("object-del", {"id": tls["id"]})
