"""``backup --all`` on the lab: four domains of the test, two backed up side by side and
restored byte for byte, one without raw disks skipped, one whose disk is gone failed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain.inventory import all_domains
from libvirt_rdm_backup.fleet import selection
from libvirt_rdm_backup.fleet.status import STATUS_NAME, parse_status
from tests.lab.domains import assert_running, wait_for_job
from tools.labkit import (
    REPO_ROOT,
    RUN_TOKEN,
    MiB,
    block_disk,
    loop_device,
    make_file,
    qcow2_disk,
    qemu_leftovers,
    rdmb_tmpdir,
    same_bytes,
    unique_name,
)
from tools.labkit import test_domain as lab_domain

pytestmark = pytest.mark.lab


@contextlib.contextmanager
def four_domains(workdir: Path) -> Iterator[dict[str, libvirt.virDomain]]:
    """running (a loop LUN), shut-off (a loop LUN), no-raw (a qcow2 image only), broken
    (shut off, its block device gone); all removed afterwards with their loop devices."""
    with contextlib.ExitStack() as stack:
        loops = {}
        for key, pattern in (("running", b"run-"), ("shut-off", b"off-")):
            backing = make_file(workdir / f"{key}.img", 64 * MiB, pattern)
            loops[key] = stack.enter_context(loop_device(backing))
        qcow2 = workdir / "system.qcow2"
        qcow2.write_bytes(b"")
        specs = {
            "running": ([block_disk("vdb", loops["running"])], True),
            "shut-off": ([block_disk("vdb", loops["shut-off"])], False),
            "no-raw": ([qcow2_disk("vda", str(qcow2))], False),
            "broken": ([block_disk("vdb", f"/dev/rdmb-gone-{RUN_TOKEN}")], False),
        }
        yield {key: stack.enter_context(lab_domain(unique_name(f"rdmb-all-{key}"), disks,
                                                    start=start))
               for key, (disks, start) in specs.items()}


def run_all(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["backup", "--all", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.fault
def test_backup_all_backs_up_skips_and_fails_each_domain_on_its_own(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    with rdmb_tmpdir() as workdir, four_domains(workdir) as doms:
        mine = {dom.UUIDString() for dom in doms.values()}
        # the lab is shared: this run sees only the domains of this test
        monkeypatch.setattr(selection, "all_domains",
                            lambda conn: [d for d in all_domains(conn) if d.UUIDString() in mine])
        repo = workdir / "repo"
        code, out, err = run_all(["--target", str(repo), "--jobs", "2", "--json"], capsys)

        doc = json.loads(out)
        by_key = {key: next(e for e in doc["domains"] if e["uuid"] == dom.UUIDString())
                  for key, dom in doms.items()}
        assert len(doc["domains"]) == 4 and doc["jobs"] == 2 and not doc["interrupted"]
        broken = by_key["broken"]
        assert broken["exit_code"] == 4 and broken["id"] is None and broken["skipped"] is None
        assert "cannot read size of /dev/rdmb-gone-" in broken["error"]
        assert code == doc["exit_code"] == broken["exit_code"]
        assert err.splitlines() == [f"rdm-backup: backup of {doms['broken'].name()} failed "
                                    f"(exit 4): {broken['error']}"]
        skipped = by_key["no-raw"]
        assert skipped["skipped"] == "no raw disks (vda: image file (qcow2), not a raw disk)"
        assert (skipped["exit_code"], skipped["id"], skipped["error"]) == (0, None, None)
        for key in ("running", "shut-off"):
            entry = by_key[key]
            assert (entry["exit_code"], entry["error"], entry["skipped"]) == (0, None, None)
            assert entry["level"] == "full" and entry["bytes"] == 64 * MiB
            out_file = workdir / f"restored-{key}.raw"
            api.restore(entry["uuid"], str(repo), "vdb", str(out_file), backup_id=entry["id"])
            assert same_bytes(out_file, workdir / f"{key}.img")

        status = parse_status((repo / STATUS_NAME).read_bytes())
        assert set(status) == mine
        assert {key: status[dom.UUIDString()].result for key, dom in doms.items()} == {
            "running": "ok", "shut-off": "ok", "no-raw": "skipped", "broken": "failed"}
        assert status[doms["broken"].UUIDString()].error == broken["error"]
        assert status[doms["running"].UUIDString()].id == by_key["running"]["id"]

        # again, as text, the broken one excluded by its UUID, each chain pruned after its
        # backup: all good, the broken one's entry kept
        code, out, err = run_all(["--target", str(repo), "--exclude",
                                  doms["broken"].UUIDString().upper(), "--prune",
                                  "--keep-last", "1"], capsys)
        assert code == 0 and err == ""
        lines = out.splitlines()
        assert lines[0] == f"{doms['no-raw'].name()}  skipped: {skipped['skipped']}"
        assert sorted(line.split()[:2] for line in lines[1:]) == sorted(
            [doms[key].name(), "ok"] for key in ("running", "shut-off"))
        again = parse_status((repo / STATUS_NAME).read_bytes())
        for key in ("running", "shut-off"):  # the prune keeps the full the next
            uuid = doms[key].UUIDString()     # differential builds on, and the newest
            assert [m.backup_id for m in api.list_backups(str(repo), uuid)] == [
                by_key[key]["id"], again[uuid].id]
        assert again[doms["broken"].UUIDString()] == status[doms["broken"].UUIDString()]
        assert again[doms["running"].UUIDString()].when > status[doms["running"].UUIDString()].when


# ``backup --all`` in a process of its own that sees only the domains named in the environment
ONLY_THESE = """
import os, sys
from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain.inventory import all_domains
from libvirt_rdm_backup.fleet import selection
mine = set(os.environ["RDMB_TEST_DOMAINS"].split(","))
selection.all_domains = lambda conn: [d for d in all_domains(conn) if d.UUIDString() in mine]
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.fault
def test_sigterm_cancels_the_running_backup_and_starts_no_more() -> None:
    with rdmb_tmpdir() as workdir, contextlib.ExitStack() as stack:
        loop = stack.enter_context(loop_device(make_file(workdir / "slow.img", 128 * MiB)))
        other = stack.enter_context(loop_device(make_file(workdir / "next.img", 8 * MiB)))
        slow = stack.enter_context(lab_domain(unique_name("rdmb-all-a-slow"),
                                              [block_disk("vdb", loop)]))
        later = stack.enter_context(lab_domain(unique_name("rdmb-all-b-next"),
                                               [block_disk("vdb", other)], start=False))
        repo = workdir / "repo"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
               "RDMB_TEST_DOMAINS": f"{slow.UUIDString()},{later.UUIDString()}"}
        proc = subprocess.Popen(
            [sys.executable, "-c", ONLY_THESE, "backup", "--all", "--target", str(repo),
             "--bwlimit", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env)
        try:
            wait_for_job(slow, proc)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 4, err
        doc = json.loads(out)
        assert doc["interrupted"] and doc["exit_code"] == 4
        first, second = doc["domains"]
        assert (first["uuid"], first["exit_code"], first["id"]) == (slow.UUIDString(), 4, None)
        assert first["error"] == "interrupted, the operation did not complete"
        assert second["error"] == "not started: the run was interrupted"
        assert err.splitlines()[-1] == "rdm-backup: error: interrupted, the run did not complete"
        assert_running(slow)
        assert qemu_leftovers(slow) == []
        assert api.list_backups(str(repo)) == []
        status = parse_status((repo / STATUS_NAME).read_bytes())
        assert set(status) == {slow.UUIDString()} and status[slow.UUIDString()].exit_code == 4
