"""An ``rbd://`` target's index is read within bounds, through the real RbdPool over a fake
ioctx that answers as an OSD does (keys in byte order, ``start_after`` paging, replies cut
short at a cap, values by key, the bindings' key decoding): an index of too many keys is
refused before any value is read, keys this tool does not write never have their values
read, a value over MAX_MANIFEST is damage, paging works across pages and capped replies, an
index changed during a read is read again."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from libvirt_rdm_backup.engine import rbd_index, rbd_store
from libvirt_rdm_backup.engine.rbd_store import REPO_KEY, RbdStore
from libvirt_rdm_backup.errors import RepositoryError, VerificationError
from libvirt_rdm_backup.repository.manifest import MAX_MANIFEST
from libvirt_rdm_backup.storage import rbd_pool
from libvirt_rdm_backup.storage.rbd_pool import RbdPool
from libvirt_rdm_backup.targets.uri import RbdAddress
from tests.unit.test_rbd_store_trust import UUID, manifest

OTHER = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
INDEX = "bk.index"
BIG = 5 << 20


class ObjectNotFound(Exception):
    pass


class _Op:
    def __init__(self) -> None:
        self.reads: list[Callable[[dict[bytes, bytes]], None]] = []

    def __enter__(self) -> _Op:
        return self

    def __exit__(self, *_exc: object) -> None:
        pass


class _Found:
    """The bindings' omap iterator: keys cut at a NUL byte and decoded as strict UTF-8."""

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes | None]] = []

    def __iter__(self) -> Iterator[tuple[str, bytes | None]]:
        for key, value in self.items:
            yield key.split(b"\0")[0].decode("utf-8"), value


class FakeIoctx:
    """One object's omap (raw byte keys) as an OSD serves it, counting what is asked."""

    def __init__(self, omap: dict[str | bytes, bytes], cap: int = 1024) -> None:
        self.omap = {k.encode() if isinstance(k, str) else k: v for k, v in omap.items()}
        self.cap = cap  # entries per reply (an OSD cuts a reply short at its caps)
        self.version = 1
        self.exists = True
        self.listed: list[str] = []  # start_after of each listing op
        self.asked: list[tuple[str, ...]] = []  # keys of each read by key
        self.fetched = 0  # value bytes sent
        self.before_read: Callable[[FakeIoctx], None] = lambda _io: None

    def write(self, key: str, value: bytes) -> None:
        self.omap[key.encode()] = value
        self.version += 1

    def get_omap_keys(self, op: _Op, after: str, count: int) -> tuple[_Found, int]:
        found = _Found()
        self.listed.append(after)

        def read(omap: dict[bytes, bytes]) -> None:
            keys = sorted(k for k in omap if k > after.encode())
            found.items = [(k, None) for k in keys[: min(count, self.cap)]]

        op.reads.append(read)
        return found, 0

    def get_omap_vals_by_keys(self, op: _Op, keys: tuple[str, ...]) -> tuple[_Found, int]:
        found = _Found()
        self.asked.append(keys)

        def read(omap: dict[bytes, bytes]) -> None:
            found.items = [(k.encode(), omap[k.encode()]) for k in keys if k.encode() in omap]
            self.fetched += sum(len(v or b"") for _k, v in found.items)

        op.reads.append(read)
        return found, 0

    def operate_read_op(self, op: _Op, _name: str) -> None:
        self.before_read(self)
        if not self.exists:
            raise ObjectNotFound()
        for read in op.reads:
            read(self.omap)

    def get_last_version(self) -> int:
        return self.version

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def fake_rados(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(ReadOpCtx=_Op, ObjectNotFound=ObjectNotFound, Error=OSError)
    monkeypatch.setattr(rbd_pool, "rados", fake)


def target(io: FakeIoctx) -> RbdStore:
    pool = RbdPool("/etc/ceph/ceph.conf", "u", "rbd")
    pool._ioctx = io
    address = RbdAddress(pool="rbd", conf="/etc/ceph/ceph.conf", user="u", prefix="bk")
    return RbdStore(address, pool)


def ids(count: int, day: int = 1) -> list[str]:
    return [f"202612{day:02d}T{h // 60:02d}{h % 60:02d}00Z-{h:06x}" for h in range(count)]


def points(count: int, uuid: str = UUID, day: int = 1) -> dict[str | bytes, bytes]:
    return {f"m.{uuid}.{b}": manifest(b, None, uuid=uuid).dumps().encode() for b in ids(count, day)}


def test_paging_works_across_pages_and_replies_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rbd_index, "KEY_PAGE", 4)
    monkeypatch.setattr(rbd_index, "VALUE_BATCH", 3)
    io = FakeIoctx({REPO_KEY: b"0d5f0c", "a.note": b"x", **points(10)}, cap=3)
    found = target(io).scan()
    assert [m.backup_id for m in found.backups] == ids(10) and found.damaged == []
    keys = sorted(k.decode() for k in io.omap)
    assert io.listed == ["", *keys[2::3]]  # each page after the last key seen
    assert [len(a) for a in io.asked] == [3, 3, 3, 1]
    assert sorted(k for a in io.asked for k in a) == [k for k in keys if k.startswith("m.")]


def test_an_index_of_too_many_keys_is_refused_before_any_value_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(rbd_index, "MAX_INDEX_KEYS", 20)
    monkeypatch.setattr(rbd_index, "KEY_PAGE", 8)
    io = FakeIoctx(points(20))
    assert len(target(io).scan().backups) == 20  # at the bound: read
    io = FakeIoctx({**points(20), **{f"x.{n}": b"" for n in range(1000)}})
    with pytest.raises(VerificationError, match="bk.index holds more than 20 keys") as err:
        target(io).scan(UUID)
    assert err.value.exit_code == 5 and "conf=" not in str(err.value)
    assert (io.listed, io.asked) == (["", *sorted(points(20))[7:16:8]], [])  # never read on


def test_keys_this_tool_does_not_write_never_have_their_values_read() -> None:
    foreign: dict[str | bytes, bytes] = {
        "x.junk": b"j" * BIG,
        "m.": b"j" * BIG,
        f"m.{UUID}": b"j" * BIG,
        f"m.{UUID}.not-a-backup-id": b"j" * BIG,
        f"m.{UUID.upper()}.{ids(1)[0]}": b"j" * BIG,
        f"m.{UUID}.{ids(1)[0]}\0tail".encode(): b"j" * BIG,  # listed as the real key
    }
    io = FakeIoctx({REPO_KEY: b"0d5f0c", **points(3), **points(2, OTHER, 2), **foreign})
    found = target(io).scan(UUID)
    assert [m.backup_id for m in found.backups] == ids(3)
    assert sorted(d.problem.split()[2] for d in found.damaged) == sorted(
        [f"m.{UUID}.not-a-backup-id", f"m.{UUID}."]
    )  # as before: damage, value not read
    assert sorted(k for a in io.asked for k in a) == sorted(str(k) for k in points(3))
    assert io.fetched < 64 << 10
    io.asked.clear()
    found = target(io).scan()
    assert len(found.backups) == 5 and len(found.damaged) == 4
    assert sorted(k for a in io.asked for k in a) == sorted(
        str(k) for k in {**points(3), **points(2, OTHER, 2)}
    )


def test_a_value_over_max_manifest_is_damage() -> None:
    huge = f"m.{UUID}.{ids(2)[1]}"
    io = FakeIoctx({**points(1), huge: b" " * (MAX_MANIFEST + 1)})
    found = target(io).scan()
    assert [m.backup_id for m in found.backups] == ids(1)
    [damage] = found.damaged
    assert (damage.backup_id, damage.problem) == (
        ids(2)[1],
        f"manifest of {MAX_MANIFEST + 1} bytes (at most {MAX_MANIFEST})",
    )


def test_an_index_changed_during_a_read_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rbd_index, "KEY_PAGE", 2)
    io = FakeIoctx(points(5))
    late = manifest(ids(6)[5], None).dumps().encode()
    reads = [0]

    def publish_once(fake: FakeIoctx) -> None:
        reads[0] += 1
        if reads[0] == 2:  # between the first and the second page
            fake.write(f"m.{UUID}.{ids(6)[5]}", late)

    io.before_read = publish_once
    assert [m.backup_id for m in target(io).scan().backups] == ids(6)
    assert io.listed.count("") == 2

    io.before_read = lambda fake: fake.write("x.busy", b"")  # a write before every op
    io.listed.clear()
    assert [m.backup_id for m in target(io).scan().backups] == ids(6)  # the last reading
    assert io.listed.count("") == rbd_index.ATTEMPTS


@pytest.mark.parametrize(
    "keys, problem",
    [
        ([b"m.\xff\xfe"], "holds an omap key that is not UTF-8"),
        ([b"k\0" + bytes([n]) for n in range(1, 5)], "cannot be listed past 'k'"),
    ],
    ids=["not-utf8", "cut-at-nul"],
)
def test_an_index_whose_keys_cannot_be_listed_is_refused(
    monkeypatch: pytest.MonkeyPatch, keys: list[bytes], problem: str
) -> None:
    monkeypatch.setattr(rbd_index, "KEY_PAGE", 2)
    io = FakeIoctx({**points(2), **dict.fromkeys(keys, b"v")})
    with pytest.raises(VerificationError, match=problem) as err:
        target(io).scan()
    assert err.value.exit_code == 5 and io.asked == []


def test_open_reads_the_repository_key_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    io = FakeIoctx({REPO_KEY: b"0d5f0c", **points(3), "x.junk": b"j" * BIG})

    def pool(*_args: Any) -> Any:
        return types.SimpleNamespace(connect=lambda: target(io).pool)

    monkeypatch.setattr(rbd_store, "RbdPool", pool)
    address = RbdAddress(pool="rbd", conf="/etc/ceph/ceph.conf", user="u", prefix="bk")
    assert RbdStore.open(address).repo_id == "0d5f0c"
    assert (io.listed, io.asked) == ([], [(REPO_KEY,)])
    io.write(REPO_KEY, b"0" * BIG)
    with pytest.raises(RepositoryError, match="holds no valid repository id"):
        RbdStore.open(address)
    io.exists = False
    assert target(io).scan().backups == []
