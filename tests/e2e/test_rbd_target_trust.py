"""An ``rbd://`` target whose pool was written by someone else: a manifest edited to name
another image of the pool is refused by verify and restore (exit 5, nothing written, the
other image's bytes never restored); writes into a backup image's head are undone before
the next point builds on it; prune removes only snapshots named as backups (a
snapshot made by hand on a backup image stays); an index whose repository id the tool
would not write is refused (exit 4); an index filled with keys this tool never writes,
with values of MiBs, is read within bounds (``list`` never fetches those values; more keys
than the bound: exit 5). Built through the store's own calls, no domain."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import cli
from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.engine import rbd_index
from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
from libvirt_rdm_backup.engine.rbd_sink import RbdSink
from libvirt_rdm_backup.engine.rbd_store import RbdStore
from libvirt_rdm_backup.engine.stores import open_store
from libvirt_rdm_backup.modes import Level
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.storage.rbd_pool import RbdPool
from tests.e2e.test_rbd_target import _remove_target
from tests.unit.test_rbd_store_trust import manifest
from tools import cephkit, labkit
from tools.labkit import MiB

pytestmark = [pytest.mark.lab, pytest.mark.hostile]

SIZE = 4 * MiB
B1, B2 = "20261201T120000Z-0000a1", "20261202T120000Z-0000b2"
LEFTOVER = "20261130T120000Z-0000ff"  # a backup id no manifest lists: a killed run's


def one_line(proc: Any, code: int, *words: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code and len(lines) == 1, (proc.returncode, proc.stderr)
    assert all(w in lines[0] for w in words), lines[0]
    return str(lines[0])


def point(
    store: RbdStore, dom: str, backup_id: str, parent: str | None, byte: int, at: int
) -> None:
    """Write a MiB of ``byte`` at ``at`` into the disk's image, snapshot it, publish it."""
    image = store.image_name(dom, "vdb")
    store.pool.ensure_image(image, SIZE, 64 * 1024)
    with store.pool.image(image) as opened:
        opened.write(bytes([byte]) * MiB, at)
    store.pool.create_snapshot(image, backup_id)
    digest = store.pool.digest(image, backup_id, "sha256")
    store.write_manifests(
        [manifest(backup_id, parent, uuid=dom, base=store.base, size=SIZE, digest=digest)]
    )


def test_an_edited_index_opens_no_other_image_and_prune_keeps_foreign_snapshots(
    ceph: None, run_token: str, rdmb_tmp: Path
) -> None:
    import rbd

    prefix = f"rdmb-{run_token}-trust"
    target = f"rbd://{cephkit.POOL}/{prefix}?conf={cephkit.CEPH_CONF}&id={cephkit.CLIENT}"
    dom = str(uuid.uuid4())
    fresh = f"rdmb-{uuid.uuid4().hex[:12]}"  # never to be created
    try:
        with cephkit.rbd_image(SIZE) as victim, cephkit.ioctx() as ctx:
            with rbd.Image(ctx, victim.name) as opened:  # another VM's image, same pool
                opened.write(b"\x66" * SIZE, 0)
                opened.create_snap(B1)
            with open_store(target, create=True) as store:
                assert isinstance(store, RbdStore)
                point(store, dom, B1, None, 0x31, 0)
                key = f"m.{dom}.{B1}"
                good = store.pool.omap_values(store.index, [key])[0][key]
                assert labkit.rdm_backup("verify", "--target", target).returncode == 0

                # the manifest edited to name the other image (its snapshot and digest too):
                # refused, where the other image's bytes would verify and be restored
                edited = manifest(
                    B1,
                    None,
                    uuid=dom,
                    base=prefix,
                    size=SIZE,
                    digest=store.pool.digest(victim.name, B1, "sha256"),
                    location={"pool": "rbd", "image": victim.name, "snapshot": B1},
                )
                edited.sequence = 1
                store.pool.set_omap(store.index, {key: edited.dumps().encode()})
                one_line(
                    labkit.rdm_backup("verify", "--target", target), 5, "where this target keeps it"
                )
                out = rdmb_tmp / "out.raw"
                one_line(
                    labkit.rdm_backup(
                        "restore", dom, "--target", target, "--disk", "vdb", "--to", str(out)
                    ),
                    5,
                    "where this target keeps it",
                )
                assert not out.exists()
                store.pool.set_omap(store.index, {key: good})

                # another writer of the pool wrote into the image's head after B1: the next
                # point's session resets the head to B1 first, so B2 holds none of it
                image = store.image_name(dom, "vdb")
                with rbd.Image(ctx, image) as opened:
                    opened.write(b"\x99" * MiB, 3 * MiB)
                store.pool.create_snapshot(image, "keep-me")
                store.pool.create_snapshot(image, LEFTOVER)
                parent = store.scan(dom).backups[0]
                plan = DiskPlan(
                    RawDisk("vdb", SourceKind.BLOCK, "disk", size=SIZE),
                    DataPath.QEMU,
                    Level.INCREMENTAL,
                    "",
                    parent=DiskPoint(parent, parent.disks[0]),
                )
                RbdSink(store, dom, B2).create(plan)
                with rbd.Image(ctx, image) as opened:  # the head reads as B1 again
                    assert opened.read(3 * MiB, MiB) == bytes(MiB)
                point(store, dom, B2, B1, 0x32, MiB)

                # prune: a snapshot made by hand stays, a killed run's leftover goes
                proc = labkit.rdm_backup("prune", dom, "--target", target, "--keep-last", "1")
                assert proc.returncode == 0, proc.stderr
                assert sorted(store.pool.snapshots(image)) == sorted([B2, "keep-me"])
                with rbd.Image(ctx, victim.name) as opened:
                    assert [s["name"] for s in opened.list_snaps()] == [B1]
                assert (
                    labkit.rdm_backup(
                        "restore", dom, "--target", target, "--disk", "vdb", "--to", str(out)
                    ).returncode
                    == 0
                )
                assert out.read_bytes() == b"\x31" * MiB + b"\x32" * MiB + bytes(2 * MiB)

                # the manifest's disk edited into an RBD disk reached as client.admin (the lab's
                # conf names the admin keyring): --to rbd: without conf/id takes no cluster or
                # user from it; the domain is not defined here, so nothing says which: refused
                [kept] = store.scan(dom).backups
                admin = RbdSource(
                    pool="rbd", image="vm-disk", user="admin", config_file=str(cephkit.CEPH_CONF)
                )
                kept.disks[0] = replace(
                    kept.disks[0], disk=RawDisk("vdb", SourceKind.RBD, "disk", rbd=admin, size=SIZE)
                )
                store.pool.set_omap(store.index, {f"m.{dom}.{B2}": kept.dumps().encode()})
                one_line(
                    labkit.rdm_backup(
                        "restore",
                        dom,
                        "--target",
                        target,
                        "--disk",
                        "vdb",
                        "--to",
                        f"rbd:rbd/{fresh}",
                    ),
                    2,
                    "the backup's own are not taken",
                )
                assert fresh not in rbd.RBD().list(ctx)

                # a repository id the tool would not write: refused before anything is read
                store.pool.set_omap(store.index, {"repo_id": b"../x"})
                one_line(
                    labkit.rdm_backup("list", "--target", target), 4, "holds no valid repository id"
                )
    finally:
        _remove_target(prefix)
        cephkit.remove_image(cephkit.POOL, fresh)


def test_an_index_filled_by_another_writer_is_read_within_bounds(
    ceph: None, run_token: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys this tool never writes, with values of MiBs, and more keys than the OSD returns in
    one reply, in a real index: ``list`` lists the real points and never fetches those values;
    more keys than the bound: refused (exit 5)."""
    prefix = f"rdmb-{run_token}-bound"
    target = f"rbd://{cephkit.POOL}/{prefix}?conf={cephkit.CEPH_CONF}&id={cephkit.CLIENT}"
    dom = str(uuid.uuid4())
    foreign = {f"x.{n}": bytes([n]) * (4 * MiB) for n in range(3)} | {"m": b"m" * 4 * MiB}
    foreign |= {f"a.{n:04d}": b"a" * 16 for n in range(1100)}  # before m.: past the OSD's
    # 1024 keys per reply (a single read saw no manifest)
    fetched: list[tuple[tuple[str, ...], int]] = []
    real = RbdPool.omap_values

    def counting(pool: RbdPool, name: str, keys: Sequence[str]) -> tuple[dict[str, bytes], int]:
        values, version = real(pool, name, keys)
        fetched.append((tuple(keys), sum(len(v) for v in values.values())))
        return values, version

    import rados

    try:
        with open_store(target, create=True) as store:
            assert isinstance(store, RbdStore)
            point(store, dom, B1, None, 0x31, 0)
            point(store, dom, B2, B1, 0x32, MiB)
            store.pool.set_omap(store.index, foreign)  # 16 MiB in one write
            with cephkit.ioctx() as ctx, rados.ReadOpCtx() as op:
                first, _ = ctx.get_omap_vals(op, "", "", 1 << 20)
                ctx.operate_read_op(op, store.index)
                assert not any(k.startswith("m.") for k, _v in first)
        monkeypatch.setattr(RbdPool, "omap_values", counting)
        capsys.readouterr()
        assert cli.main(["list", "--target", target]) == 0
        out = capsys.readouterr().out
        assert [line.split()[0] for line in out.splitlines()] == [B1, B2], out
        asked = {key for keys, _n in fetched for key in keys}
        assert asked == {"repo_id", f"m.{dom}.{B1}", f"m.{dom}.{B2}"}, asked
        assert sum(n for _k, n in fetched) < 256 * 1024, fetched  # manifests: KiBs, not MiBs

        # more keys than the bound (1000 here; the index holds 1107): refused before any value
        monkeypatch.setattr(rbd_index, "MAX_INDEX_KEYS", 1000)
        fetched.clear()
        assert cli.main(["list", "--target", target]) == 5
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{prefix}.index holds more than 1000 keys" in err[0], err
        assert "conf=" not in err[0]
        assert [keys for keys, _n in fetched] == [("repo_id",)]  # opening: the id alone
    finally:
        _remove_target(prefix)
