"""``prune`` of an NBD volume served by ``receive``: kept layers rewritten into fresh
regions by QEMU, published with the drops in one write; every kept point restores
byte-identical, ``verify`` is clean, the served file shrinks, the next incremental works."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.test_nbd_target import reference, restore_compare, server
from tests.lab.volume_server import VolumeServer
from tools.labkit import MiB, guest_write, lab_vm, rdm_backup

pytestmark = pytest.mark.lab
__all__ = ["server"]  # the fixture

LEVELS = ["full", "incremental", "incremental", "full", "incremental", "incremental"]


def test_prune_of_a_volume_keeps_every_kept_point_restorable(server: VolumeServer) -> None:
    with lab_vm(loop_size=48 * MiB) as vm:
        made: list[str] = []
        refs = {}
        for index, level in enumerate(LEVELS):
            guest_write(vm.dom, "vdb", 0x50 + index, (index % 3) * 8 * MiB, 6 * MiB)
            refs[index] = {"vdb": reference(vm, str(index))["vdb"]}
            proc = rdm_backup("backup", vm.name, "--target", server.uri, "--disk", "vdb",
                              "--level", level, "--json")
            assert proc.returncode == 0, proc.stderr
            made.append(json.loads(proc.stdout)["backup_id"])
        before = os.stat(server.path).st_blocks * 512

        proc = rdm_backup("prune", vm.name, "--target", server.uri, "--keep-last", "2",
                          "--json")
        assert proc.returncode == 0, proc.stderr
        [chain] = json.loads(proc.stdout)
        kept = [p["backup_id"] for p in chain["points"] if p["action"] == "keep"]
        assert chain["dropped"] == [i for i in made if i not in kept]
        assert kept == [made[3], made[4], made[5]]  # the newest full stays for differentials
        assert [m["kept"] for m in chain["merges"]] == []  # nothing kept built on a drop
        proc = rdm_backup("prune", vm.name, "--target", server.uri, "--keep-last", "1",
                          "--json")
        assert proc.returncode == 0, proc.stderr
        [chain] = json.loads(proc.stdout)
        assert chain["dropped"] == [made[4]]
        assert [(m["kept"], m["base"]) for m in chain["merges"]] == [(made[5], made[3])]
        assert chain["freed_bytes"] > 0

        listed = rdm_backup("list", vm.name, "--target", server.uri, "--json")
        assert [b["backup_id"] for b in json.loads(listed.stdout)] == [made[3], made[5]]
        proc = rdm_backup("verify", vm.name, "--target", server.uri)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        restore_compare(vm, server.uri, made[3], refs[3])
        restore_compare(vm, server.uri, made[5], refs[5])
        assert os.stat(server.path).st_blocks * 512 < before

        guest_write(vm.dom, "vdb", 0x7A, 40 * MiB, MiB)
        now = {"vdb": reference(vm, "now")["vdb"]}
        proc = rdm_backup("backup", vm.name, "--target", server.uri, "--disk", "vdb", "--json")
        assert proc.returncode == 0, proc.stderr
        document = json.loads(proc.stdout)
        assert document["level"] == "incremental"
        restore_compare(vm, server.uri, document["backup_id"], now)
