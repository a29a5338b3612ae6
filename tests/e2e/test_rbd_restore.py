"""Restore into a Ceph RBD image (``--to rbd:POOL/IMAGE``): a new image created thin, an
existing one with other content overwritten, both byte for byte the point; a too-small
image, malformed destinations and an image in use refused with exit 2 and nothing written;
the cephx key in no argv and no -vv output. ``--to-original``: the disk's own image, found by
its id, written back; refused while the domain runs and once the image was made anew."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import api
from tests.e2e.test_encrypted_layers import argv_watch
from tools import cephkit, labkit
from tools.labkit import MiB, same_bytes

pytestmark = pytest.mark.lab

SIZE = 64 * MiB


def allocated(image: cephkit.RbdImage) -> int:
    """Bytes of the image the cluster holds data for (``diff_iterate`` from its creation)."""
    import rbd

    total = 0

    def count(_offset: int, length: int, exists: bool) -> int:
        nonlocal total
        total += length if exists else 0
        return 0

    with cephkit.ioctx(image.pool) as ctx, rbd.Image(ctx, image.name, read_only=True) as opened:
        opened.diff_iterate(0, image.size, None, count)
    return total


def exists(name: str) -> bool:
    import rbd

    with cephkit.ioctx() as ctx:
        return name in rbd.RBD().list(ctx)


def refused(proc: Any, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and all(w in lines[0] for w in words), proc.stderr


def test_restore_into_rbd_images(ceph: None, run_token: str, rdmb_tmp: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    repo = str(rdmb_tmp / "repo")
    keyring = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text()
    key = keyring.split("key = ")[1].split()[0]
    new = cephkit.RbdImage(cephkit.POOL, f"rdmb-{uuid.uuid4().hex[:12]}", SIZE)
    with cephkit.rbd_image(SIZE) as image, cephkit.rbd_image(SIZE) as other, \
            cephkit.rbd_image(32 * MiB) as small, \
            labkit.test_domain(f"rdmb-{run_token}-rbd-rs", [cephkit.rbd_disk("vdb", image)],
                               start=False) as dom:
        try:
            name = str(dom.name())
            cephkit.write_pattern(image, 0, 2 * MiB, 0x31)
            cephkit.write_pattern(image, 40 * MiB, MiB, 0x32)
            assert labkit.rdm_backup("backup", name, "--target", repo).returncode == 0
            ref = rdmb_tmp / "point.raw"
            api.restore(name, repo, "vdb", str(ref))
            assert same_bytes(ref, cephkit.export(image, rdmb_tmp / "source.raw"))

            # a new image: created thin with the disk's size, through the CLI
            with argv_watch(key.encode()) as seen:
                proc = labkit.rdm_backup("-vv", "restore", name, "--target", repo, "--disk",
                                         "vdb", "--to", f"rbd:{new.spec}")
            assert proc.returncode == 0, proc.stderr
            assert not seen, f"the key was in the argv of pids {seen}"
            assert key not in proc.stdout + proc.stderr
            assert same_bytes(cephkit.export(new, rdmb_tmp / "new.raw"), ref)
            assert allocated(new) <= 4 * MiB + 4 * MiB  # the data only, in 4 MiB objects

            # an existing image with other content everywhere: overwritten, zeros included
            cephkit.write_pattern(other, 0, SIZE, 0x77)
            result = api.restore(name, repo, "vdb", f"rbd:{other.spec}")
            assert result.size == SIZE and result.path == f"rbd:{other.spec}"
            assert same_bytes(cephkit.export(other, rdmb_tmp / "other.raw"), ref)
            assert allocated(other) <= 8 * MiB  # the zeros were discarded, not written

            # another cluster/user named in the spec, its key from RDM_BACKUP_CEPH_KEYRING
            cephkit.write_pattern(other, 0, SIZE, 0x78)
            monkeypatch.setenv("RDM_BACKUP_CEPH_KEYRING", str(
                cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring"))
            api.restore(name, repo, "vdb", f"rbd:{other.spec}?conf={cephkit.CEPH_CONF}"
                        f"&id={cephkit.CLIENT}")
            monkeypatch.delenv("RDM_BACKUP_CEPH_KEYRING")
            assert same_bytes(cephkit.export(other, rdmb_tmp / "other-2.raw"), ref)

            # the shut-off domain's own image, changed since: back in place
            cephkit.write_pattern(image, 10 * MiB, MiB, 0x66)
            api.restore(name, repo, "vdb", f"rbd:{image.spec}")
            assert same_bytes(cephkit.export(image, rdmb_tmp / "in-place.raw"), ref)

            # refusals: nothing written, nothing created
            cephkit.write_pattern(small, 0, MiB, 0x55)
            before = cephkit.export(small, rdmb_tmp / "small-before.raw").read_bytes()
            refused(labkit.rdm_backup("restore", name, "--target", repo, "--disk", "vdb",
                                      "--to", f"rbd:{small.spec}"), "too small")
            after = cephkit.export(small, rdmb_tmp / "small-after.raw").read_bytes()
            assert before == after
            ghost = f"rdmb-{uuid.uuid4().hex[:12]}"
            for spec in ("rbd:rbd", f"rbd:rbd/{ghost}?bogus=1", f"rbd:rbd/{ghost}@snap",
                         f"rbd:rbd/{ghost}?conf=relative.conf"):
                refused(labkit.rdm_backup("restore", name, "--target", repo, "--disk", "vdb",
                                          "--to", spec), "malformed")
            assert not exists(ghost)

            # the running domain's own image has a watcher (its QEMU): in use
            dom.create()
            try:
                refused(labkit.rdm_backup("restore", name, "--target", repo, "--disk", "vdb",
                                          "--to", f"rbd:{image.spec}"), "in use", "watcher")
            finally:
                dom.destroy()
        finally:
            cephkit.remove_image(new.pool, new.name)


def forged_refused(repo: Path, args: tuple[str, ...], image: cephkit.RbdImage,
                   tmp: Path) -> None:
    """A backup edited to name another image (no monitors: this host's Ceph configuration; the
    cluster's admin; the lab's libvirt secret; that image's id) is refused, with its cluster's
    fsid (the domain's definition here has another image at the disk) and without it (exit 2,
    the other image unchanged); the backup is put back as it was."""
    [path] = repo.glob("*/*/manifest.json")
    text = path.read_text()
    with cephkit.rbd_image(SIZE) as other, cephkit.ioctx(other.pool) as ctx:
        import rbd

        with rbd.Image(ctx, other.name, read_only=True) as opened:
            other_id = str(opened.id())
        cephkit.write_pattern(other, 0, MiB, 0x5A)
        before = cephkit.export(other, tmp / "other.raw")
        try:
            for drop_fsid, words in ((False, f"has rbd:{image.spec} at vdb, the backup's disk "
                                             f"was rbd:{other.spec}; restore it with --to "
                                             f"rbd:{other.spec}?conf=PATH&id=USER"),
                                     (True, "no RBD cluster_fsid")):
                document = json.loads(text)
                [disk] = [d for d in document["disks"] if d["disk"] == "vdb"]
                disk["identifiers"]["rbd"] = {"pool": other.pool, "image": other.name, "hosts": [],
                                       "user": "admin", "secret_uuid": cephkit.secret_uuid()}
                root = disk["mapping"]["storage"]
                root["identity"].update(image=other.name, image_id=other_id)
                if drop_fsid:
                    del root["identity"]["cluster_fsid"]
                path.write_text(json.dumps(document))
                refused(labkit.rdm_backup(*args), words)
        finally:
            path.write_text(text)
        assert same_bytes(cephkit.export(other, tmp / "other-after.raw"), before)


def test_restore_to_the_original_rbd_image(ceph: None, run_token: str, rdmb_tmp: Path) -> None:
    """``--to-original`` finds the disk's image by its id: written back byte for byte while the
    domain is shut off (a dry run first writes nothing); refused while the domain runs, once
    the image was removed and made anew under its name, and for a backup edited to name another
    image (exit 2, nothing written)."""
    repo = str(rdmb_tmp / "repo")
    with cephkit.rbd_image(SIZE) as image, \
            labkit.test_domain(f"rdmb-{run_token}-rbd-or", [cephkit.rbd_disk("vdb", image)],
                               start=False) as dom:
        name = str(dom.name())
        cephkit.write_pattern(image, 0, 2 * MiB, 0x41)
        cephkit.write_pattern(image, 50 * MiB, MiB, 0x42)
        ref = cephkit.export(image, rdmb_tmp / "point.raw")
        assert labkit.rdm_backup("backup", name, "--target", repo).returncode == 0
        cephkit.write_pattern(image, 0, SIZE, 0x66)  # changed everywhere since the point
        changed = cephkit.export(image, rdmb_tmp / "changed.raw")
        args = ("restore", name, "--target", repo, "--disk", "vdb", "--to-original", "--json")

        proc = labkit.rdm_backup(*args, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        [entry] = json.loads(proc.stdout)["disks"]
        assert entry["path"] == f"rbd:{image.spec}", entry
        assert entry["matched_on"].startswith("RBD image id "), entry
        assert same_bytes(cephkit.export(image, rdmb_tmp / "dry.raw"), changed)
        forged_refused(Path(repo), args, image, rdmb_tmp)

        proc = labkit.rdm_backup(*args)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["disks"][0]["data_bytes"] == 3 * MiB
        assert same_bytes(cephkit.export(image, rdmb_tmp / "restored.raw"), ref)

        cephkit.write_pattern(image, 0, MiB, 0x67)
        before = cephkit.export(image, rdmb_tmp / "before.raw")
        dom.create()
        try:
            refused(labkit.rdm_backup(*args), "in use by running domain", "--force")
        finally:
            dom.destroy()
        assert same_bytes(cephkit.export(image, rdmb_tmp / "unchanged.raw"), before)
        cephkit.remove_image(image.pool, image.name)  # made anew: another image id
        with cephkit.ioctx(image.pool) as ctx:
            import rbd

            rbd.RBD().create(ctx, image.name, SIZE, old_format=False)
        cephkit.write_pattern(image, 0, MiB, 0x67)
        anew = cephkit.export(image, rdmb_tmp / "anew.raw")
        refused(labkit.rdm_backup(*args), "has image id", "made anew", f"--to rbd:{image.spec}")
        assert same_bytes(cephkit.export(image, rdmb_tmp / "after.raw"), anew)
