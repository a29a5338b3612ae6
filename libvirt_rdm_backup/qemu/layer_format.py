"""How new layers are written: compressed clusters (zlib or zstd), by QEMU itself.

A compressed layer is a qcow2 image created with that ``compression_type`` whose
clusters are written compressed: by QEMU's backup job with ``compress: true``
(the guest's QEMU), or through a ``compress`` filter node on top of the layer
(mirror jobs of the private storage daemon, ``qemu-nbd`` of a resync). Readers
need nothing: QEMU decompresses any cluster it reads. A later write into such a
layer (a prune's merge) stores plain clusters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.modes import Compression, parse_choice


@dataclass(frozen=True)
class LayerFormat:
    """What a new layer is created with (the default: plain clusters)."""

    compression: Compression | None = None

    def __post_init__(self) -> None:
        if self.compression is not None:
            object.__setattr__(self, "compression",
                               parse_choice(Compression, self.compression, "compression"))

    @property
    def compress(self) -> bool:
        """True when the layer's clusters are written compressed."""
        return self.compression is not None

    def create_options(self) -> dict[str, str]:
        """``qemu-img create -o`` options of a new layer."""
        if self.compression is None:
            return {}
        return {"compression_type": str(self.compression)}

    def writer(self, node: dict[str, Any]) -> dict[str, Any]:
        """Blockdev options that write into the layer ``node`` (compressed: through a
        ``compress`` filter, for writers that have no ``compress`` option of their own)."""
        if self.compression is None:
            return node
        return {"driver": "compress", "file": node}

    def record(self) -> str | None:
        """The manifest's ``compression`` of the layer (None: plain)."""
        return None if self.compression is None else str(self.compression)


PLAIN = LayerFormat()
