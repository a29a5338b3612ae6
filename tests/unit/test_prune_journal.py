"""The prune journal: read back as untrusted input, acted on only when it is what the tool
writes (ids and names of the layout, merges of dropped points onto kept ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine import consolidate
from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.prune_journal import (
    Journal,
    Merge,
    read_journal,
    remove_journal,
    write_journal,
)
from libvirt_rdm_backup.repository.store import Repository
from tests.unit.test_repository_damage_units import IDS, publish
from tests.unit.test_repository_damage_units import UUID as DAMAGE_UUID

UUID = "5b0a8a7e-3f43-4c1c-9a55-1d6f0f4c2a10"
F0, I1, I2 = "20261101T100000Z-aaaaaa", "20261101T110000Z-bbbbbb", "20261102T100000Z-cccccc"


def journal() -> Journal:
    return Journal(UUID, "default", "2026-12-07T10:00:00Z", (F0, I1),
                   (Merge("vdb", I2, (I1, F0), None, "up"),))


def test_a_journal_reads_back_as_written(tmp_path: Path) -> None:
    write_journal(str(tmp_path), journal())
    assert read_journal(str(tmp_path)) == journal()
    remove_journal(str(tmp_path))
    assert read_journal(str(tmp_path)) is None


@pytest.mark.parametrize("change, problem", [
    ({"drop": ["../../etc"]}, "malformed"),
    ({"domain_uuid": "../x"}, "malformed"),
    ({"merges": [{"disk": "../vdb", "kept": I2, "dropped": [I1], "base": None,
                  "direction": "up"}]}, "malformed"),
    ({"merges": [{"disk": "vdb", "kept": I2, "dropped": [I1], "base": None,
                  "direction": "sideways"}]}, "direction"),
    ({"merges": [{"disk": "vdb", "kept": I2, "dropped": [I2], "base": None,
                  "direction": "up"}]}, "not dropped"),
    ({"merges": [{"disk": "vdb", "kept": I1, "dropped": [F0], "base": None,
                  "direction": "up"}]}, "onto a dropped point"),
    ({"format": "something/else"}, "unknown format"),
    ({"version": 99}, "version"),
])
def test_a_journal_the_tool_would_not_write_is_refused(tmp_path: Path, change: dict[str, object],
                                                       problem: str) -> None:
    document = {**json.loads(journal().dumps()), **change}
    (tmp_path / ".prune-journal.json").write_text(json.dumps(document))
    with pytest.raises(RepositoryError, match=problem):
        read_journal(str(tmp_path))


def test_a_journal_of_another_domain_is_not_carried_out(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    other = "0b0a8a7e-3f43-4c1c-9a55-1d6f0f4c2a10"
    directory = Path(repo.domain_dir(other))
    directory.mkdir()
    write_journal(str(directory), journal())
    with pytest.raises(RepositoryError, match="names another domain"):
        consolidate.finish(repo, other)


def test_an_oversized_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / ".prune-journal.json").write_bytes(b" " * (4 << 20) + b"{}")
    with pytest.raises(RepositoryError, match="over"):
        read_journal(str(tmp_path))


@pytest.fixture
def layered(tmp_path: Path) -> tuple[Repository, list[Manifest]]:
    """A repository with a full backup and two incrementals of vdb."""
    repo = Repository.open(str(tmp_path / "layered"), create=True)
    return repo, [publish(repo, IDS[0], None, b"full" * 1000),
                  publish(repo, IDS[1], IDS[0], b"inc1" * 100),
                  publish(repo, IDS[2], IDS[1], b"inc2" * 100)]


def test_a_journal_dropping_the_newest_point_removes_nothing(
        layered: tuple[Repository, list[Manifest]]) -> None:
    repo, manifests = layered
    full, inc1, inc2 = (m.backup_id for m in manifests)
    directory = Path(repo.domain_dir(DAMAGE_UUID))
    write_journal(str(directory), Journal(DAMAGE_UUID, "default", "now", (inc2,), ()))
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(RepositoryError, match="which the next backup builds on; nothing more"):
        consolidate.finish(repo, DAMAGE_UUID)
    assert sorted(p.name for p in directory.iterdir()) == before


def test_a_journal_dropping_a_point_that_others_build_on_removes_nothing(
        layered: tuple[Repository, list[Manifest]]) -> None:
    repo, manifests = layered
    full, inc1, inc2 = (m.backup_id for m in manifests)
    directory = Path(repo.domain_dir(DAMAGE_UUID))
    write_journal(str(directory), Journal(DAMAGE_UUID, "default", "now", (inc1,), ()))
    with pytest.raises(RepositoryError, match="no merge takes it in; nothing more is done"):
        consolidate.finish(repo, DAMAGE_UUID)
    assert [m.backup_id for m in repo.scan(DAMAGE_UUID).backups] == [full, inc1, inc2]


def test_a_journal_whose_merge_does_not_fit_the_layers_changes_nothing(
        layered: tuple[Repository, list[Manifest]]) -> None:
    """The dropped list out of order: the headers say otherwise, no job is started."""
    repo, manifests = layered
    full, inc1, inc2 = (m.backup_id for m in manifests)
    directory = Path(repo.domain_dir(DAMAGE_UUID))
    layer = directory / inc2 / "vdb.qcow2"
    before = layer.read_bytes()
    write_journal(str(directory), Journal(DAMAGE_UUID, "default", "now", (full, inc1),
                                          (Merge("vdb", inc2, (full, inc1), None, "up"),)))
    with pytest.raises(RepositoryError, match="nothing more is done"):
        consolidate.finish(repo, DAMAGE_UUID)
    assert layer.read_bytes() == before
    assert len(repo.scan(DAMAGE_UUID).backups) == 3
