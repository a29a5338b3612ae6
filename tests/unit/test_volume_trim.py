"""Space given back on the backup server: the regions of dropped points, trimmed through NBD,
are holes again in the file ``receive`` serves (a real ``receive``, no VM)."""

from __future__ import annotations

import os
from pathlib import Path

from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.uri import NbdAddress, parse_target
from libvirt_rdm_backup.targets.volume_space import normalize, overlap
from tests.unit.test_receive_volume import start_receive, stop_receive
from tests.unit.test_repository_damage_units import UUID
from tests.unit.test_volume_space import MiB, backup
from tools.labkit import free_port

DATA = 16 * MiB  # written into each layer region


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_dropped_points_are_holes_in_the_served_file_again(tmp_path: Path) -> None:
    volume_file = tmp_path / "vol.img"
    proc, uri = start_receive(volume_file, "--listen", f"127.0.0.1:{free_port()}",
                              "--size", str(256 * MiB))
    try:
        address = parse_target(uri)
        assert isinstance(address, NbdAddress)
        vol = NbdVolume.open(address, create=True)
        vol.settle = 0.0
        try:
            points = [_filled(vol, index) for index in range(3)]
            vol.flush()
            before = allocated(volume_file)
            assert before >= 3 * DATA
            report = vol.publish_changes(UUID, drop=[points[0], points[1]])
            after = allocated(volume_file)
            assert report.trimmed == report.free >= 2 * DATA
            assert before - after >= 2 * DATA - MiB, (before, after)
            assert vol.trim_free() == report.free  # again: idempotent, nothing left to give
            assert allocated(volume_file) == after
            free = vol.superblock.free
            again = _filled(vol, 7)  # the next backup takes a freed region
            entry = next(e for e in vol.superblock.entries if e["backup_id"] == again)
            owned = [tuple(r) for r in entry["regions"]]
            assert normalize(overlap(owned, free)) == normalize(owned)
        finally:
            vol.close()
    finally:
        stop_receive(proc)


def _filled(vol: NbdVolume, index: int) -> str:
    """A backup whose layer holds DATA bytes of data; its id."""
    return backup(vol, index, fill=DATA, region=DATA + MiB).backup_id
