"""How new layers are written: compressed clusters (zlib or zstd) and LUKS encryption,
both by QEMU itself.

A compressed layer is a qcow2 image created with that ``compression_type`` whose
clusters are written compressed: by QEMU's backup job with ``compress: true``
(the guest's QEMU), or through a ``compress`` filter node on top of the layer
(mirror jobs of the private storage daemon, ``qemu-nbd`` of a resync). Readers
need nothing: QEMU decompresses any cluster it reads. A later write into such a
layer (a prune's merge) stores plain clusters.

An encrypted layer is a qcow2 image with ``encrypt.format=luks`` whose key is the
secret object :data:`~.secrets.SECRET_ID` of the QEMU that creates, writes or reads
it. The two are never combined: QEMU 7.2 stores a compressed cluster of an encrypted
qcow2 image unencrypted (``qemu-img convert -c`` refuses the pair; a block job's
compressed writes do not), so an encrypted layer is always written plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.modes import Compression, parse_choice
from libvirt_rdm_backup.qemu.layers import encrypt_options
from libvirt_rdm_backup.qemu.secrets import SECRET_ID

LUKS_ITER_TIME = 200  # ms of PBKDF2 per key slot (the keys are files, not typed passwords)


@dataclass(frozen=True)
class LayerFormat:
    """What a new layer is created with (the default: plain clusters)."""

    compression: Compression | None = None
    key_id: str | None = None  # the key's id when new layers are encrypted (LUKS)
    salt: str | None = None  # recorded beside the key id where no repository record holds it

    def __post_init__(self) -> None:
        if self.compression is not None:
            object.__setattr__(self, "compression",
                               parse_choice(Compression, self.compression, "compression"))
        refuse_compressed_encryption(self.compression, self.key_id is not None)

    @property
    def compress(self) -> bool:
        """True when the layer's clusters are written compressed."""
        return self.compression is not None

    def create_options(self) -> dict[str, str]:
        """``qemu-img create -o`` options of a new layer."""
        options = {}
        if self.compression is not None:
            options["compression_type"] = str(self.compression)
        if self.encrypted:
            options.update({"encrypt.format": "luks", "encrypt.key-secret": SECRET_ID,
                            "encrypt.iter-time": str(LUKS_ITER_TIME)})
        return options

    @property
    def encrypted(self) -> bool:
        """True when new layers are LUKS-encrypted."""
        return self.key_id is not None

    def layer(self, node: dict[str, Any]) -> dict[str, Any]:
        """The qcow2 node ``node`` of a new layer, with its ``encrypt`` options."""
        if not self.encrypted:
            return node
        return {**node, "encrypt": encrypt_options(SECRET_ID)}

    def writer(self, node: dict[str, Any]) -> dict[str, Any]:
        """Blockdev options that write into the layer ``node`` (compressed: through a
        ``compress`` filter, for writers that have no ``compress`` option of their own)."""
        if self.compression is None:
            return node
        return {"driver": "compress", "file": node}

    def record(self) -> str | None:
        """The manifest's ``compression`` of the layer (None: plain)."""
        return None if self.compression is None else str(self.compression)

    def encryption(self) -> dict[str, Any] | None:
        """The manifest's ``encryption`` of the layer (None: not encrypted)."""
        if self.key_id is None:
            return None
        found = {"format": "luks", "key_id": self.key_id}
        return found if self.salt is None else {**found, "salt": self.salt}

    @classmethod
    def of_record(cls, encryption: dict[str, Any] | None) -> LayerFormat:
        """Plain or encrypted layers as a disk record's ``encryption`` says (a prune's
        merged layer is written as the layers it merges)."""
        if encryption is None:
            return PLAIN
        salt = encryption.get("salt")
        return cls(key_id=str(encryption["key_id"]), salt=None if salt is None else str(salt))


def refuse_compressed_encryption(compression: object, encrypted: bool) -> None:
    """UsageError for compressed encrypted layers (QEMU would store their data in clear)."""
    if compression is not None and encrypted:
        raise UsageError("--compress cannot be combined with --encrypt-key-file: QEMU "
                         "stores the compressed clusters of an encrypted qcow2 image "
                         "unencrypted")


PLAIN = LayerFormat()
