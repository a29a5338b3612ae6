"""The hook installed into the real /etc/libvirt/hooks and run by the real libvirtd.

libvirtd looks for hook scripts when it starts, so the module installs the hook (with its own
state directory) and restarts libvirtd; afterwards it removes the hook and restarts libvirtd
again. libvirtd is started again whatever fails; running domains survive its restarts.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import libvirt
import pytest

from libvirt_rdm_backup import events, hook
from tests.lab.domains import assert_running
from tests.oracles import hook_installed
from tools.labkit import URI, domain_xml
from tools.labkit import test_domain as lab_domain

pytestmark = [pytest.mark.lab, pytest.mark.serial]  # installs the hook, restarts libvirtd

HOOKS_DIR = hook.HOOKS_DIR


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def libvirtd_pids() -> list[int]:
    proc = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True,
                          timeout=30, check=False)
    return [int(pid) for pid in proc.stdout.split()]


def libvirtd_answers() -> bool:
    proc = subprocess.run(["virsh", "-c", URI, "version"], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=30, check=False)
    return proc.returncode == 0


def wait_for_other_clients(timeout: float = 60.0) -> None:
    """Let other clients of libvirtd (another test run) finish before a restart cuts them off."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = subprocess.run(["virt-admin", "srv-clients-list", "libvirtd"],
                              capture_output=True, text=True, timeout=30, check=False)
        clients = [x.strip() for x in proc.stdout.splitlines()[2:] if x.strip()]
        if proc.returncode != 0 or not clients:
            return
        pids = []
        for client in clients:
            info = subprocess.run(["virt-admin", "client-info", "libvirtd", client.split()[0]],
                                  capture_output=True, text=True, timeout=30, check=False)
            pids += [x.split(":")[-1].strip() for x in info.stdout.splitlines()
                     if "process_id" in x]
        print(f"waiting for clients of libvirtd to go (pids {', '.join(pids)}; "
              f"this is {os.getpid()})", file=sys.stderr)
        time.sleep(1)


LAB_SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "lab.sh"


def start_libvirtd() -> None:
    """Start libvirtd unless it runs; wait until it answers."""
    if not libvirtd_pids():
        # the lab's own way, so the daemon comes back as the lab configured it
        subprocess.run([str(LAB_SCRIPT), "up"], stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
                       check=True)
    wait_until(libvirtd_answers, 60, f"libvirtd to answer on {URI}")


def restart_libvirtd() -> None:
    """Stop libvirtd (SIGTERM to its pid) and start it again; it is started even on failure."""
    wait_for_other_clients()
    began = time.monotonic()
    try:
        for pid in libvirtd_pids():
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not libvirtd_pids(), 60, "libvirtd to exit")
    finally:
        stopped = time.monotonic()
        start_libvirtd()
        print(f"libvirtd restarted: {stopped - began:.1f} s to stop, "
              f"{time.monotonic() - stopped:.1f} s to answer again", file=sys.stderr)


@pytest.fixture(scope="module")
def state_dir() -> Iterator[Path]:
    """The hook installed with a temporary state directory, seen by a restarted libvirtd."""
    if os.geteuid() != 0:
        pytest.skip("needs root: installs a libvirt hook and restarts libvirtd")
    script = Path(hook.hook_path(HOOKS_DIR))
    previous = script.read_bytes() if script.exists() else None
    if previous is not None and not hook_installed(HOOKS_DIR):
        pytest.skip(f"{script} exists and was not written by libvirt-rdm-backup")
    had_qemu_d = script.parent.is_dir()
    tmp = Path(tempfile.mkdtemp(prefix="rdmb-hook-", dir="/var/tmp"))
    try:
        message = hook.install(HOOKS_DIR, python=sys.executable, state_dir=str(tmp / "events"))
        assert "restart libvirtd" in message
        restart_libvirtd()
        yield tmp / "events"
    finally:
        try:
            if previous is None:
                hook.uninstall(HOOKS_DIR)
            else:
                script.write_bytes(previous)
                script.chmod(0o755)
            if not had_qemu_d:
                try:
                    script.parent.rmdir()
                except OSError:
                    pass
        finally:
            try:
                restart_libvirtd()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)


def wait_event(uuid: str, kind: str, state: Path, after: str | None = None) -> events.Event:
    """The domain's newest ``kind`` event (at or after ``after``), waited for up to 30 s."""
    found: list[events.Event] = []

    def check() -> bool:
        recent = (events.events_since(uuid, after, str(state)) if after
                  else events.read_events(uuid, str(state)))
        found[:] = [e for e in recent if e.event == kind]
        return bool(found)

    wait_until(check, 30, f"a {kind!r} event of {uuid}")
    return found[-1]


def qemu_cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_start_and_stop_are_recorded(state_dir: Path, run_token: str) -> None:
    name = f"rdmb-hook-{run_token}"
    since = now_iso()
    with lab_domain(name, []) as dom:
        uuid = dom.UUIDString()
        started = wait_event(uuid, "started", state_dir)
        assert started.pid is not None and started.operation == "started"
        assert "qemu-system" in qemu_cmdline(started.pid)
        assert f"guest={name}" in qemu_cmdline(started.pid)
    stopped = wait_event(uuid, "stopped", state_dir)
    assert (stopped.operation, stopped.sub, stopped.pid) == ("stopped", "end", started.pid)
    recorded = events.events_since(uuid, since, str(state_dir))
    assert [e.event for e in recorded] == ["started", "stopped"]
    assert started.when <= stopped.when
    assert events.describe_restart(uuid, since, str(state_dir)) == (
        f"the VM was started at {started.when:%Y-%m-%dT%H:%M:%SZ} and stopped at "
        f"{stopped.when:%Y-%m-%dT%H:%M:%SZ}")
    path = state_dir / f"{uuid}.jsonl"
    assert path.stat().st_mode & 0o777 == 0o600
    assert state_dir.stat().st_mode & 0o777 == 0o700


def test_save_and_restore_are_recorded(state_dir: Path, run_token: str, rdmb_tmp: Path) -> None:
    """``restore`` passes the XML through the hook: empty output must leave it unchanged."""
    with lab_domain(f"rdmb-hooksr-{run_token}", []) as dom:
        uuid = dom.UUIDString()
        first = wait_event(uuid, "started", state_dir)
        since = now_iso()
        saved = rdmb_tmp / "saved.img"
        dom.save(str(saved))
        dom.connect().restore(str(saved))
        assert_running(dom)
        second = wait_event(uuid, "started", state_dir, after=since)
        assert second.pid is not None and second.pid != first.pid
        recorded = [e.event for e in events.events_since(uuid, since, str(state_dir))]
        assert recorded == ["stopped", "restored", "started"]
        text = events.describe_restart(uuid, since, str(state_dir))
        assert text is not None and text.startswith("the VM was stopped at ")
        assert "(3 stops and starts since" in text


def test_libvirtd_restart_is_a_reconnect(state_dir: Path, run_token: str) -> None:
    """QEMU survives a libvirtd restart: ``reconnected``, same pid, no restart described."""
    name = f"rdmb-hookrc-{run_token}"
    conn = libvirt.open(URI)
    dom = conn.defineXML(domain_xml(name, []))
    uuid = dom.UUIDString()
    try:
        dom.create()
        started = wait_event(uuid, "started", state_dir)
        since = now_iso()
        del dom  # a domain object keeps its connection open
        assert conn.close() == 0
        restart_libvirtd()
        reconnected = wait_event(uuid, "reconnected", state_dir, after=since)
        assert (reconnected.operation, reconnected.pid) == ("reconnect", started.pid)
        assert events.describe_restart(uuid, since, str(state_dir)) is None
    finally:
        start_libvirtd()
        again = libvirt.open(URI)
        try:
            leftover = again.lookupByUUIDString(uuid)
            if leftover.isActive():
                leftover.destroy()
            leftover.undefine()
        finally:
            again.close()


def test_backup_names_the_restart_that_lost_tracking(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from libvirt_rdm_backup import api
    from tools.labkit import MiB, guest_write, lab_vm

    monkeypatch.setenv(events.STATE_DIR_ENV, str(state_dir))
    with lab_vm(loop_size=64 * MiB, lun_size=16 * MiB) as vm:
        repo = str(vm.workdir / "repo")
        guest_write(vm.dom, "vdb", 0x31, 0, MiB)
        api.backup(vm.name, repo, disks=["vdb"])
        vm.dom.destroy()
        vm.dom.create()
        wait_event(vm.uuid, "started", state_dir)
        guest_write(vm.dom, "vdb", 0x32, 2 * MiB, MiB)
        result = api.backup(vm.name, repo, disks=["vdb"])
        vdb = result.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "resync"
        assert "the VM was stopped at" in vdb.reason and "started at" in vdb.reason
        assert "tracking was lost" in vdb.reason
