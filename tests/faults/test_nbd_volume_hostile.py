"""A served NBD volume whose table of contents was written by someone hostile: damage, exit 5.

The volume file is written here, then served by ``rdm-backup receive``; the
tool reads it through NBD as it would a backup server's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup.targets.volume_format import _HEAD, MAGIC, SLOT
from tests.lab.volume_server import VolumeServer
from tools.labkit import rdmb_tmpdir

pytestmark = [pytest.mark.lab, pytest.mark.hostile]
EXE = Path(sys.executable).parent / "rdm-backup"
GOOD = {"format": "libvirt-rdm-backup/nbd-volume", "version": 1, "id": "abc123",
        "next_free": 4 << 20, "entries": []}
ENTRY = {"backup_id": "20260101T000000Z-abcdef", "domain_uuid":
         "6f0c9e4e-0000-4000-8000-000000000001", "published": "2026-01-01T00:00:00.000Z"}


def slot(doc: object, length: int | None = None) -> bytes:
    body = json.dumps(doc).encode()
    return _HEAD.pack(MAGIC, 5, len(body) if length is None else length,
                      hashlib.sha256(body).digest()) + body


@pytest.fixture
def served() -> Iterator[tuple[Path, VolumeServer]]:
    with rdmb_tmpdir() as work:
        server = VolumeServer(work / "volume.img", size=64 << 20)
        yield work, server
        server.stop()


def serve(server: VolumeServer, slot_a: bytes, slot_b: bytes) -> None:
    with open(server.path, "wb") as stream:
        stream.write(slot_a)
        stream.seek(SLOT)
        stream.write(slot_b)
    server.start()


def damage(*args: str) -> str:
    proc = subprocess.run([str(EXE), *args], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 5, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    return proc.stderr


@pytest.mark.parametrize("slots", [
    (slot({**GOOD, "next_free": 1 << 70}), slot(GOOD, length=1 << 62)),
    (slot({**GOOD, "entries": [7] * 10000}), slot({**GOOD, "id": "../../etc"})),
], ids=["huge-pointer-and-length", "bad-entries-and-id"])
def test_a_hostile_table_of_contents_is_damage(served: tuple[Path, VolumeServer],
                                               slots: tuple[bytes, bytes]) -> None:
    work, server = served
    serve(server, *slots)
    for command in ("list", "verify"):
        assert "table of contents is damaged" in damage(command, "--target", server.uri)
    proc = subprocess.run([str(EXE), "restore", ENTRY["domain_uuid"], "--target", server.uri,
                           "--disk", "vdb", "--to", str(work / "out.raw")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 5 and "table of contents is damaged" in proc.stderr
    assert not (work / "out.raw").exists()


@pytest.mark.parametrize("place", [[4 << 20, 1 << 62], [1 << 62, 100], [0, 4096]],
                         ids=["huge-length", "beyond-the-volume", "over-the-superblock"])
def test_a_manifest_placed_outside_the_volume_is_damage(served: tuple[Path, VolumeServer],
                                                        place: list[int]) -> None:
    _work, server = served
    serve(server, slot({**GOOD, "entries": [{**ENTRY, "manifest": place}]}), b"")
    listed = damage("list", "--target", server.uri)
    assert ENTRY["backup_id"] in listed and "outside the volume" in listed
    assert ENTRY["backup_id"] in damage("verify", "--target", server.uri)
