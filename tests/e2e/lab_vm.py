"""The acceptance VM: a loop LUN (with an offset), an iSCSI LUN on tgtd, a qcow2 system disk.

It lives in :mod:`tools.labkit` (the demo builds it too); re-exported here for the tests.
"""

from __future__ import annotations

from tools.labkit import LOOP_OFFSET, GiB, LabVM, MiB, fill, lab_vm, same_bytes, snapshot_source

__all__ = ["LOOP_OFFSET", "GiB", "LabVM", "MiB", "fill", "lab_vm", "same_bytes",
           "snapshot_source"]
