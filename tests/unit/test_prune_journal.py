"""The prune journal: read back as untrusted input, acted on only when it is what the tool
writes (ids and names of the layout, merges of dropped points onto kept ones)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine import consolidate
from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.repository.prune_journal import (
    Journal,
    Merge,
    read_journal,
    remove_journal,
    write_journal,
)
from libvirt_rdm_backup.repository.store import Repository

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
