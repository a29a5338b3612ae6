"""The LUKS key slots of one encrypted layer, changed by ``qemu-img amend``.

Every call opens exactly one layer file, its ``backing`` null (no name in its header
is opened); a layer given as an open descriptor is handed over as ``/dev/fd/N`` (the
very file checked through it, whatever its path names meanwhile). A layer given as a
protocol node is the window of its LUKS header alone (e.g. a ``raw`` node of those bytes
of a volume region): QEMU opens it with its ``luks`` driver and reads or writes nothing
outside it, nor any qcow2 header. The keys are secret objects read from private files
(:func:`.secrets.key_file`): argv holds their paths, never a key. QEMU rewrites only the
LUKS header of the layer (its key slots); the clusters stay as they are.
"""

from __future__ import annotations

from typing import Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import CommandError
from libvirt_rdm_backup.process import run, stall_timeout
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.layer_format import LUKS_ITER_TIME
from libvirt_rdm_backup.qemu.layers import FORMAT, encrypt_options, file_node, json_filename
from libvirt_rdm_backup.qemu.secrets import secret_definition

OLD_SECRET = "rdmb-old-key"
NEW_SECRET = "rdmb-new-key"
# what qemu-img says when no key slot opens with the secret it was given
WRONG_KEY = "cannot unlock any keyslot"
NO_SUCH_SLOT = "No keyslots match given"


# a layer file's path, a descriptor open on it, or the protocol node of its LUKS header
Layer = str | int | dict[str, Any]


def _image(layer: Layer, secret_id: str) -> str:
    if isinstance(layer, dict):
        return json_filename({"driver": "luks", "key-secret": secret_id, "file": layer})
    path = f"/dev/fd/{layer}" if isinstance(layer, int) else layer
    node: dict[str, Any] = {"driver": FORMAT, "file": file_node(path), "backing": None,
                            "encrypt": encrypt_options(secret_id)}
    return json_filename(node)


def _options(layer: Layer, options: str) -> str:
    """``qemu-img amend`` options: of the qcow2's ``encrypt``, or of a LUKS header node."""
    if isinstance(layer, dict):
        return options
    return ",".join(f"encrypt.{option}" for option in options.split(","))


def _fds(layer: Layer) -> tuple[int, ...]:
    return ((layer,) if isinstance(layer, int) else ()) + img.object_fds()


def _objects(old_path: str, new_path: str) -> list[str]:
    """Both keys' secrets, after the objects of the block (:func:`.img.objects`: the TLS
    credentials of a volume)."""
    return [*img.object_args(), "--object", secret_definition(old_path, OLD_SECRET),
            "--object", secret_definition(new_path, NEW_SECRET)]


def opens_with(layer: Layer, old_path: str, new_path: str, new: bool) -> bool:
    """True when a key slot of the layer opens with the new key (``new``) or the old one
    (``qemu-io`` opens it read-only and reads its first sector); CommandError when it
    fails for another reason."""
    secret = NEW_SECRET if new else OLD_SECRET
    command = "quit" if isinstance(layer, dict) else "read 0 512"  # a header: no payload
    argv = ["qemu-io", "-r", *_objects(old_path, new_path), "-c", command,
            _image(layer, secret)]
    try:
        run(argv, stall=stall_timeout(), pass_fds=_fds(layer))
    except CommandError as err:
        if WRONG_KEY in str(err):
            return False
        raise
    return True


def add_key(layer: Layer, old_path: str, new_path: str) -> bool:
    """A key slot for the new key (the layer opened with the old one); False when the old
    key opens no slot of the layer."""
    argv = ["qemu-img", "amend", *_objects(old_path, new_path), "-o",
            _options(layer, f"state=active,new-secret={NEW_SECRET},"
                            f"iter-time={LUKS_ITER_TIME}"), _image(layer, OLD_SECRET)]

    def attempt() -> bool:
        try:
            run(argv, stall=stall_timeout(), pass_fds=_fds(layer))  # dies with this process
        except CommandError as err:
            if img.LUKS_BENCHMARK_FAILED in str(err):
                raise retry.Again() from err
            if WRONG_KEY in str(err):
                return False
            raise
        return True

    name = "a LUKS header node" if isinstance(layer, dict) else str(layer)
    return bool(retry.luks_create(name, img.LUKS_ATTEMPTS)(attempt))


def remove_key(layer: Layer, old_path: str, new_path: str) -> None:
    """Every key slot of the old key erased (the layer opened with the new one); a layer
    without one is left as it is."""
    argv = ["qemu-img", "amend", *_objects(old_path, new_path), "-o",
            _options(layer, f"state=inactive,old-secret={OLD_SECRET}"),
            _image(layer, NEW_SECRET)]
    try:
        run(argv, stall=stall_timeout(), pass_fds=_fds(layer))
    except CommandError as err:
        if NO_SUCH_SLOT not in str(err):
            raise
