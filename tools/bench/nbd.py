"""Section ``nbd``: the full backup of vdb pushed to an NBD volume served by ``rdm-backup
receive``, against the same into a file repository and a bare ``qemu-img convert`` into a
plain ``qemu-nbd`` export. Servers are stopped by pid."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libvirt_rdm_backup import api
from tools.bench.common import (
    DISK,
    Lab,
    MiB,
    Run,
    allocated_bytes,
    goal,
    median,
    print_timings,
    remove_tree,
    run_convert,
    same_content,
    say,
    settle,
)
from tools.bench.full import run_rdm_backup
from tools.labkit import free_port, qemu_leftovers, rdm_backup_argv

NBD_EXPORT = "rdmb-bench-vol"  # the export of `rdm-backup receive` (an NBD volume)
NBD_PLAIN_EXPORT = "rdmb-bench-raw"  # the plain qemu-nbd export qemu-img convert writes into
NBD_METHODS = ("file_target_s", "nbd_push_s", "qemu_img_convert_nbd_s")
SERVER_WAIT = 20.0  # seconds a server gets to listen
SERVER_STOP = 10.0  # seconds a server gets to exit after SIGTERM


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (``/proc/PID/task/*/children``)."""
    found: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as stream:
                found.update(int(value) for value in stream.read().split())
        except OSError:
            pass
    return sorted(found)


def alive_as(pid: int, comm: str) -> bool:
    """Whether ``pid`` is a live (not zombie) process named ``comm``."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stream:
            stat = stream.read()
    except OSError:
        return False
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    state = stat[stat.rindex(")") + 2:].split()[0]
    return name == comm and state not in ("Z", "X")


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class NbdServer:
    """A server on 127.0.0.1 (``rdm-backup receive`` or ``qemu-nbd``), known by its pids."""

    what: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    children: list[int] = field(default_factory=list)  # receive's qemu-nbd
    problems: list[str] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [self.proc.pid, *self.children]


def wait_listening(server: NbdServer) -> None:
    """Until something accepts connections on the server's port (or it exits)."""
    deadline = time.monotonic() + SERVER_WAIT
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.what} exited ({server.proc.returncode}) before "
                               f"listening on 127.0.0.1:{server.port}: {log_tail(server.log)}")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server.what} did not listen on 127.0.0.1:{server.port} "
                                   f"within {SERVER_WAIT:g} s: {log_tail(server.log)}") from None
            time.sleep(0.05)


def stop_server(server: NbdServer) -> None:
    """SIGTERM to the server's pid (SIGKILL after 10 s); then any child that outlived it."""
    proc = server.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(SERVER_STOP)
        except subprocess.TimeoutExpired:
            server.problems.append(f"{server.what} (pid {proc.pid}) ignored SIGTERM: killed")
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.returncode != 0:
        server.problems.append(f"{server.what} (pid {proc.pid}) exited with "
                               f"{proc.returncode}: {log_tail(server.log)}")
    for pid in server.children:
        deadline = time.monotonic() + SERVER_STOP
        while alive_as(pid, "qemu-nbd") and time.monotonic() < deadline:
            time.sleep(0.05)
        if alive_as(pid, "qemu-nbd"):
            server.problems.append(f"qemu-nbd (pid {pid}) outlived {server.what}: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for problem in server.problems:
        say(f"nbd: {problem}")


@contextmanager
def nbd_server(what: str, argv: list[str], port: int, log: Path,
               announced: str | None = None) -> Iterator[NbdServer]:
    """A server process listening on 127.0.0.1:``port``; stopped by pid on exit.

    ``announced``: the URI it prints first as one JSON line (``receive --json``).
    """
    with log.open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=err,
                                stdout=subprocess.PIPE if announced else subprocess.DEVNULL)
    server = NbdServer(what, proc, port, log)
    try:
        if announced is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            try:
                uri = json.loads(line)["uri"]
            except (ValueError, KeyError, TypeError):
                raise RuntimeError(f"{what} announced {line!r}: {log_tail(log)}") from None
            if uri != announced:
                raise RuntimeError(f"{what} serves {uri}, not {announced}")
        wait_listening(server)
        server.children = child_pids(proc.pid)
        yield server
    finally:
        stop_server(server)


def run_nbd_push(domain: str, uri: str, volume: Path) -> tuple[Run, dict[str, Any]]:
    """The library's full backup of vdb pushed to an NBD volume; the run and its location."""
    last_progress: list[float] = []

    def progress(_job: str, _done: int, _total: int) -> None:
        last_progress[:] = [time.monotonic()]

    started = time.monotonic()
    result = api.backup(domain, uri, disks=[DISK], progress=progress)
    seconds = time.monotonic() - started
    record = result.manifest.disks[0]
    if record.level != "full":
        raise RuntimeError(f"a backup into a fresh NBD volume was a {record.level}: "
                           f"{record.reason}")
    extra = {
        "manifest_stored_bytes": float(record.stored_bytes),
        "bytes_transferred": float(record.bytes_transferred),
    }
    if last_progress:
        extra["copy_s"] = last_progress[0] - started
    return Run(seconds, volume, extra), dict(record.location or {})


def volume_layer(volume: Path, location: dict[str, Any]) -> str:
    """A ``json:`` filename of a disk's qcow2 layer inside a volume file (for ``-F qcow2``)."""
    return "json:" + json.dumps({"file": {
        "driver": "raw", "offset": int(location["offset"]), "size": int(location["region"]),
        "file": {"driver": "file", "filename": str(volume)}}})


@dataclass
class NbdRound:
    """What one measured run of the nbd section leaves for the report."""

    run: Run
    verified: bool | None = None
    servers: list[NbdServer] = field(default_factory=list)


def nbd_file_target(lab: Lab, round_no: int, verify: bool) -> NbdRound:
    """:func:`api.backup` of vdb into a fresh repository directory."""
    repo = lab.work / f"rdmb-nbd-file-repo-{round_no}"
    try:
        settle(lab.args)
        run = run_rdm_backup(lab.name, repo)
        same = same_content(lab.device, run.image, "qcow2") if verify else None
    finally:
        remove_tree(repo)
    return NbdRound(run, same)


def nbd_push(lab: Lab, round_no: int, verify: bool) -> NbdRound:
    """:func:`api.backup` of vdb into a fresh volume served by ``rdm-backup receive``."""
    volume = lab.work / f"rdmb-nbd-volume-{round_no}.img"
    log = lab.work / f"rdmb-nbd-receive-{round_no}.log"
    port = free_port()
    uri = f"nbd://127.0.0.1:{port}/{NBD_EXPORT}"
    argv = [*rdm_backup_argv(), "receive", "--volume", str(volume), "--listen",
            f"127.0.0.1:{port}", "--export", NBD_EXPORT, "--json"]
    servers: list[NbdServer] = []
    try:
        with nbd_server("rdm-backup receive", argv, port, log, announced=uri) as server:
            servers.append(server)
            settle(lab.args)
            run, location = run_nbd_push(lab.name, uri, volume)
        # the server is gone: the volume file holds everything that was pushed
        run.extra["volume_stored_bytes"] = float(allocated_bytes(volume))
        run.extra["volume_size_bytes"] = float(volume.stat().st_size)
        same = (same_content(lab.device, volume_layer(volume, location), "qcow2")
                if verify else None)
    finally:
        remove_tree(volume)
        remove_tree(log)
    return NbdRound(run, same, servers)


def nbd_convert(lab: Lab, round_no: int, verify: bool) -> NbdRound:
    """``qemu-img convert`` of the LUN into a plain qemu-nbd export of a fresh sparse file."""
    image = lab.work / f"rdmb-nbd-plain-{round_no}.raw"
    log = lab.work / f"rdmb-nbd-qemu-nbd-{round_no}.log"
    port = free_port()
    url = f"nbd://127.0.0.1:{port}/{NBD_PLAIN_EXPORT}"
    argv = ["qemu-nbd", "-f", "raw", "--persistent", "--shared=0", "-b", "127.0.0.1",
            "-p", str(port), "-x", NBD_PLAIN_EXPORT, str(image)]
    servers: list[NbdServer] = []
    try:
        fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, lab.size)
        finally:
            os.close(fd)
        with nbd_server("qemu-nbd", argv, port, log) as server:
            servers.append(server)
            settle(lab.args)
            seconds = run_convert(lab.device, url, "raw")
        run = Run(seconds, image, {"stored_bytes": float(allocated_bytes(image))})
        same = same_content(lab.device, image, "raw") if verify else None
    finally:
        remove_tree(image)
        remove_tree(log)
    return NbdRound(run, same, servers)


def section_nbd(lab: Lab) -> dict[str, Any]:
    """NBD SECTION: push to an NBD volume vs a file repository vs qemu-img convert into NBD."""
    args = lab.args
    assert lab.dom is not None
    measure = {"file_target_s": nbd_file_target, "nbd_push_s": nbd_push,
               "qemu_img_convert_nbd_s": nbd_convert}
    labels = {"file_target_s": "rdm-backup -> file repository",
              "nbd_push_s": "rdm-backup -> NBD volume (receive)",
              "qemu_img_convert_nbd_s": "qemu-img convert -O raw -> qemu-nbd"}
    runs: dict[str, list[Run]] = {key: [] for key in NBD_METHODS}
    verified: dict[str, bool] = {}
    pids: list[int] = []
    problems: list[str] = []
    for round_no in range(args.repeat):
        shift = round_no % len(NBD_METHODS)
        for key in NBD_METHODS[shift:] + NBD_METHODS[:shift]:
            done = measure[key](lab, round_no, round_no == 0 and not args.no_verify)
            for server in done.servers:
                pids += server.pids
                problems += server.problems
            if done.verified is not None:
                verified[key] = done.verified
            runs[key].append(done.run)
            say(f"nbd round {round_no + 1}/{args.repeat}: {labels[key]}: "
                f"{done.run.seconds:.2f} s")

    def med(key: str, extra: str | None = None) -> float:
        if extra is None:
            return median([r.seconds for r in runs[key]])
        return median([r.extra[extra] for r in runs[key] if extra in r.extra])

    file_s, push_s = med("file_target_s"), med("nbd_push_s")
    convert_s = med("qemu_img_convert_nbd_s")
    data = lab.data_bytes
    volume_stored = med("nbd_push_s", "volume_stored_bytes")
    file_stored = med("file_target_s", "stored_bytes")
    convert_stored = med("qemu_img_convert_nbd_s", "stored_bytes")

    def to_data(value: float) -> float | None:
        return round(value / data, 4) if data else None

    runs_s: dict[str, list[float]] = {key: [round(r.seconds, 3) for r in values]
                                      for key, values in runs.items()}
    for key in ("file_target_s", "nbd_push_s"):
        runs_s[f"{key.removesuffix('_s')}_copy_s"] = [
            round(r.extra["copy_s"], 3) for r in runs[key] if "copy_s" in r.extra]
    return {
        "nbd_export": NBD_EXPORT,
        "nbd_plain_export": NBD_PLAIN_EXPORT,
        "file_target_s": round(file_s, 3),
        "nbd_push_s": round(push_s, 3),
        "qemu_img_convert_nbd_s": round(convert_s, 3),
        "file_target_copy_s": round(med("file_target_s", "copy_s"), 3),
        "nbd_push_copy_s": round(med("nbd_push_s", "copy_s"), 3),
        "ratio_nbd_push_vs_file_target": round(push_s / file_s, 3),
        "ratio_nbd_push_vs_convert_nbd": round(push_s / convert_s, 3),
        "nbd_volume_stored_bytes": int(volume_stored),
        "nbd_volume_stored_ratio_to_data": to_data(volume_stored),
        "nbd_volume_stored_ratio_to_file_target":
            round(volume_stored / file_stored, 4) if file_stored else None,
        "nbd_volume_size_bytes": int(med("nbd_push_s", "volume_size_bytes")),
        "nbd_push_manifest_stored_bytes": int(med("nbd_push_s", "manifest_stored_bytes")),
        "nbd_push_bytes_transferred": int(med("nbd_push_s", "bytes_transferred")),
        "file_target_stored_bytes": int(file_stored),
        "file_target_stored_ratio_to_data": to_data(file_stored),
        "qemu_img_convert_nbd_stored_bytes": int(convert_stored),
        "qemu_img_convert_nbd_stored_ratio_to_data": to_data(convert_stored),
        "nbd_verified_identical": verified,
        "nbd_runs_s": runs_s,
        "nbd_server_pids": sorted(set(pids)),
        "nbd_server_problems": problems,
        "nbd_qemu_leftovers": qemu_leftovers(lab.dom),
    }


def print_nbd(doc: dict[str, Any]) -> None:
    lun = doc["lun_bytes"]
    runs = doc["nbd_runs_s"]
    print("== nbd: full backup of vdb pushed to an NBD volume (`rdm-backup receive` on "
          "127.0.0.1) vs to a file repository vs `qemu-img convert -f raw -O raw` into a "
          "plain qemu-nbd export (rotated order per round)")
    print_timings("method",
                  (("file_target_s", "rdm-backup -> file repository (api.backup)"),
                   ("nbd_push_s", "rdm-backup -> NBD volume (api.backup)"),
                   ("qemu_img_convert_nbd_s", "qemu-img convert -> qemu-nbd export")),
                  doc, runs, lun, 44)
    print(f"  until the copy job ended: file repository {doc['file_target_copy_s']:.3f} s, "
          f"NBD volume {doc['nbd_push_copy_s']:.3f} s")
    print("  ratio = push time / other time (below 1: the push is faster)")
    print(f"    vs the file repository:              "
          f"{goal(doc, 'ratio_nbd_push_vs_file_target')}")
    print(f"    vs qemu-img convert into NBD:        {doc['ratio_nbd_push_vs_convert_nbd']:.3f}"
          "   (no goal, context)")
    data = doc["data_bytes"]
    print(f"  on disk (st_blocks) for {data / MiB:.0f} MiB of data: volume file "
          f"{doc['nbd_volume_stored_bytes'] / MiB:.2f} MiB (ratio to data "
          f"{doc['nbd_volume_stored_ratio_to_data']}; its apparent size "
          f"{doc['nbd_volume_size_bytes'] / MiB:.0f} MiB, sparse), file repository's backup "
          f"{doc['file_target_stored_bytes'] / MiB:.2f} MiB "
          f"({doc['file_target_stored_ratio_to_data']}), convert's raw file "
          f"{doc['qemu_img_convert_nbd_stored_bytes'] / MiB:.2f} MiB "
          f"({doc['qemu_img_convert_nbd_stored_ratio_to_data']})")
    print(f"  push manifest: stored {doc['nbd_push_manifest_stored_bytes'] / MiB:.2f} MiB, "
          f"copied {doc['nbd_push_bytes_transferred'] / MiB:.2f} MiB")
    if doc["nbd_verified_identical"]:
        checks = ", ".join(f"{k.removesuffix('_s')}={'identical' if v else 'DIFFERENT'}"
                           for k, v in doc["nbd_verified_identical"].items())
        print(f"  first-round copies vs the LUN (qemu-img compare): {checks}")
    for problem in doc["nbd_server_problems"]:
        print(f"  SERVER: {problem}")
    if doc["nbd_qemu_leftovers"]:
        print(f"  LEFT IN QEMU by the backups: {', '.join(doc['nbd_qemu_leftovers'])}")
    print()
