"""Merging layers of a chain with QEMU (a private qemu-storage-daemon, qemu-img): what the
top reads never changes, and the header ends up naming the base given."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup.qemu import layers
from libvirt_rdm_backup.qemu.layer_jobs import commit_into, rebase_onto, stream_into

MiB = 1 << 20
SIZE = 16 * MiB


def qemu(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def chain(tmp_path: Path) -> list[Path]:
    """F <- I1 <- I2 <- I3 as a file repository lays them out, each writing 2 MiB."""
    names = ["F", "I1", "I2", "I3"]
    paths = []
    for index, name in enumerate(names):
        path = tmp_path / name / "vdb.qcow2"
        path.parent.mkdir()
        backing = ["-b", f"../{names[index - 1]}/vdb.qcow2", "-F", "qcow2"] if index else []
        qemu("qemu-img", "create", "-q", "-f", "qcow2", *backing, str(path), str(SIZE))
        qemu("qemu-io", "-f", "qcow2", "-c", f"write -P {0x11 * (index + 1)} {index}M 2M",
             str(path))
        paths.append(path)
    return paths


def content(path: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "content.raw"
    qemu("qemu-img", "convert", "-O", "raw", str(path), str(out))
    return out.read_bytes()


def test_streaming_the_middle_up_keeps_what_the_top_reads(chain: list[Path],
                                                          tmp_path: Path) -> None:
    full, i1, i2, i3 = chain
    before = content(i3, tmp_path)
    stream_into(str(i3), [str(i2), str(i1)], [str(full)], "../F/vdb.qcow2", "vdb")
    assert layers.file_problem(str(i3), "../F/vdb.qcow2", SIZE) is None
    assert content(i3, tmp_path) == before
    stream_into(str(i3), [str(full)], [], None, "vdb")  # down to a whole layer
    assert layers.file_problem(str(i3), None, SIZE) is None
    assert content(i3, tmp_path) == before


def test_committing_down_makes_the_bottom_read_as_the_top(chain: list[Path],
                                                          tmp_path: Path) -> None:
    full, i1, i2, i3 = chain
    before = content(i3, tmp_path)
    commit_into(str(i3), [str(i2)], str(i1), [str(full)], SIZE, "vdb")
    assert content(i1, tmp_path) == before
    assert content(i3, tmp_path) == before  # the top is left as it was
    assert layers.file_problem(str(i1), "../F/vdb.qcow2", SIZE) is None


def test_rebasing_onto_another_layer_keeps_what_the_top_reads(chain: list[Path],
                                                              tmp_path: Path) -> None:
    full, i1, i2, i3 = chain
    before = content(i3, tmp_path)
    rebase_onto(str(i3), [str(i2), str(i1), str(full)], str(full), "../F/vdb.qcow2")
    assert layers.file_problem(str(i3), "../F/vdb.qcow2", SIZE) is None
    assert content(i3, tmp_path) == before
    assert content(full, tmp_path) != before
