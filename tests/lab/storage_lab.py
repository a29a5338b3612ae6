"""Real storage for lab tests: loop devices, iSCSI LUNs on a loopback tgtd, scratch directories.

The fixtures live in :mod:`tools.labkit`, shared with the bench and the demo; they are
re-exported here for the tests.
"""

from __future__ import annotations

from tools.labkit import (
    PORTAL_HOST,
    PORTAL_PORT,
    REFLINK_DIR,
    RUN_TOKEN,
    TIMEOUT,
    IscsiLun,
    ensure_tgtd,
    free_port,
    is_root,
    iscsi_target,
    loop_device,
    make_file,
    rdmb_reflink_tmpdir,
    rdmb_tmpdir,
    reflink_dir,
    unique_name,
)

__all__ = [
    "PORTAL_HOST", "PORTAL_PORT", "REFLINK_DIR", "RUN_TOKEN", "TIMEOUT", "IscsiLun",
    "ensure_tgtd", "free_port", "is_root", "iscsi_target", "loop_device", "make_file",
    "rdmb_reflink_tmpdir", "rdmb_tmpdir", "reflink_dir", "unique_name",
]
