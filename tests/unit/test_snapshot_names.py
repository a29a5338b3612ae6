"""Names of a chain's bitmaps and storage snapshots, and the rules for touching clones.

Chains ``daily``, ``daily-offsite``, ``Daily`` and two long names sharing their first
16 characters never claim each other's objects; names older versions wrote are still
recognised for the chain that made them, but never deleted by prefix.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.qemu.bitmaps import bitmap_name, chain_prefix, in_chain
from libvirt_rdm_backup.storage.clones import (
    SNAPSHOT_DIR,
    clone_exists,
    clone_path,
    clone_problem,
    remove_clone,
)
from libvirt_rdm_backup.storage.snapshots import (
    StorageSnapshot,
    check_name,
    handle_problem,
    in_scope,
    legacy_prefix,
    scope_problem,
    scoped_prefix,
    stale_clones,
)

REPO = "1a2b3c"
BACKUP = "20261125T143000Z-abcdef"
LONG_A = "nightly-offsite-copy-a"
LONG_B = "nightly-offsite-copy-b"  # the same first 16 characters as LONG_A
CHAINS = ["daily", "daily-offsite", "Daily", "daily_offsite", "daily.offsite", LONG_A, LONG_B,
          "daily-vdb", f"daily-{BACKUP}"]


def test_bitmaps_of_one_chain_are_never_another_chains() -> None:
    for chain in CHAINS:
        own = bitmap_name(REPO, chain, BACKUP)
        assert in_chain(own, chain_prefix(REPO, chain))
        for other in CHAINS:
            if other != chain:
                assert not in_chain(own, chain_prefix(REPO, other)), (chain, other)
    # names of the form older versions wrote are the same: still found
    assert bitmap_name(REPO, "daily", BACKUP) == f"rdmb-{REPO}-daily-{BACKUP}"
    assert not in_chain(f"rdmb-{REPO}-daily-{BACKUP}x", chain_prefix(REPO, "daily"))
    assert not in_chain(f"rdmb-{REPO}-daily-", chain_prefix(REPO, "daily"))


def test_snapshot_names_of_one_chain_are_never_another_chains() -> None:
    for chain in CHAINS:
        name = scoped_prefix(REPO, chain, "sda") + "0a1b2c"
        assert check_name(name) == name and len(name) <= 64
        assert in_scope(name, scoped_prefix(REPO, chain, "sda"))
        assert scope_problem(name, REPO, chain, "sda") is None
        for other in CHAINS:
            if other != chain:
                assert not in_scope(name, scoped_prefix(REPO, other, "sda")), (chain, other)
                assert scope_problem(name, REPO, other, "sda") is not None, (chain, other)
        assert not in_scope(name, scoped_prefix(REPO, chain, "sdb"))
        assert not in_scope(name, scoped_prefix("ffffff", chain, "sda"))
    assert not in_scope(scoped_prefix(REPO, "daily", "sda") + "0a1b2c3", scoped_prefix(
        REPO, "daily", "sda"))


def test_older_snapshot_names_are_recognised_for_their_chain_only() -> None:
    old = legacy_prefix(REPO, "daily", "sda") + "0a1b2c"
    assert old == f"rdmb-{REPO}-daily-sda-0a1b2c"  # what older versions wrote
    assert scope_problem(old, REPO, "daily", "sda") is None
    assert scope_problem(old, REPO, "daily-offsite", "sda") is not None
    first = "rdmb-snap-sda-0a1b2c"  # what the first versions wrote, for any chain
    assert scope_problem(first, REPO, "daily", "sda") is None
    assert scope_problem(first, REPO, "daily", "sdb") is not None
    # the new prefix never matches an old name, so pruning never deletes one
    for chain in CHAINS:
        assert not in_scope(old, scoped_prefix(REPO, chain, "sda"))
        assert not in_scope(first, scoped_prefix(REPO, chain, "sda"))


def _disk() -> RawDisk:
    return RawDisk("sda", SourceKind.BLOCK, "lun", source_path="/dev/null")


def test_a_handle_must_be_exactly_what_the_agent_derives() -> None:
    name = scoped_prefix(REPO, "daily", "sda") + "0a1b2c"
    expected = {"backing": "/srv/lun.img", "clone": clone_path("/srv/lun.img", name), "lun": 1}
    snap = StorageSnapshot("tgt-reflink", "sda", name, "2026-11-25T14:30:00.000Z", 1,
                           dict(expected))
    assert handle_problem("tgt-reflink", _disk(), snap, expected) is None
    for key, bad in (("clone", "/etc/shadow"), ("backing", "/etc/shadow"), ("lun", "1"),
                     ("lun", True)):
        hostile = StorageSnapshot(**{**snap.__dict__, "handle": {**expected, key: bad}})
        assert key in str(handle_problem("tgt-reflink", _disk(), hostile, expected))
    assert handle_problem("loop-reflink", _disk(), snap, expected)
    other_disk = StorageSnapshot(**{**snap.__dict__, "disk": "sdb"})
    assert handle_problem("tgt-reflink", _disk(), other_disk, expected)
    bad_name = StorageSnapshot(**{**snap.__dict__, "name": "../../etc/shadow"})
    assert handle_problem("tgt-reflink", _disk(), bad_name, expected)


def test_clones_are_touched_only_as_regular_files_in_the_real_directory(tmp_path: Path) -> None:
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"lun")
    victim = tmp_path / "victim.img"
    victim.write_bytes(b"precious")
    prefix = scoped_prefix(REPO, "daily", "sda")
    snapdir = tmp_path / SNAPSHOT_DIR
    snapdir.mkdir(mode=0o700)
    clone, link, fifo = (prefix + t for t in ("0a0a0a", "0b0b0b", "0c0c0c"))
    Path(clone_path(str(backing), clone)).write_bytes(b"clone")
    os.symlink(victim, clone_path(str(backing), link))
    os.mkfifo(clone_path(str(backing), fifo))
    other_chain = scoped_prefix(REPO, "Daily", "sda") + "0d0d0d"
    Path(clone_path(str(backing), other_chain)).write_bytes(b"other")

    assert clone_exists(str(backing), clone) and clone_problem(str(backing), clone) is None
    assert not clone_exists(str(backing), link)
    assert "not a regular file" in str(clone_problem(str(backing), link))
    assert stale_clones(str(backing), prefix, set()) == [clone]  # no symlink, no fifo
    assert stale_clones(str(backing), prefix, {clone}) == []
    with pytest.raises(StorageError, match="not a regular file"):
        remove_clone(str(backing), link)
    with pytest.raises(StorageError, match="not a regular file"):
        remove_clone(str(backing), fifo)
    remove_clone(str(backing), clone)
    remove_clone(str(backing), clone)  # idempotent
    assert victim.read_bytes() == b"precious" and os.path.islink(clone_path(str(backing), link))
    assert Path(clone_path(str(backing), other_chain)).read_bytes() == b"other"


def test_a_symlinked_snapshot_directory_is_never_entered(tmp_path: Path) -> None:
    backing = tmp_path / "lun.img"
    backing.write_bytes(b"lun")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    name = scoped_prefix(REPO, "daily", "sda") + "0a0a0a"
    (elsewhere / f"{name}.img").write_bytes(b"precious")
    os.symlink(elsewhere, tmp_path / SNAPSHOT_DIR)
    assert "not a snapshot directory" in str(clone_problem(str(backing), name))
    with pytest.raises(StorageError):
        stale_clones(str(backing), scoped_prefix(REPO, "daily", "sda"), set())
    with pytest.raises(StorageError):
        remove_clone(str(backing), name)
    assert (elsewhere / f"{name}.img").read_bytes() == b"precious"
