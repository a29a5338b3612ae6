"""``rdm-backup restore --live`` on the lab, shared by its tests and the bench: the command
started as a process, the wait until the domain runs, what the guest reads from its disk.

The command runs with ``PYTHONPATH`` set to this tree, so that the tree's library is the one
started (the venv's console script may belong to another checkout).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import libvirt

from tools.guestkit import Guest, GuestError, GuestTimeout
from tools.labkit import REPO_ROOT, rdm_backup_argv

MiB = 1 << 20
BLOCK = 65536  # the guest's dd block size; offsets and lengths are multiples of it


def start_live_restore(domain: str, target: str, *extra: str,
                       scratch: Path | None = None) -> subprocess.Popen[str]:
    """``rdm-backup restore DOMAIN --target TARGET --live --json EXTRA...`` as a process
    (stdout and stderr piped); ``scratch`` is its ``RDM_BACKUP_SCRATCH_DIR``."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    if scratch is not None:
        env["RDM_BACKUP_SCRATCH_DIR"] = str(scratch)
    return subprocess.Popen(
        [*rdm_backup_argv(), "restore", domain, "--target", target, "--live", "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_running(dom: libvirt.virDomain, proc: subprocess.Popen[str], timeout: float) -> None:
    """Return once the domain runs; :class:`GuestError` if the command ended first,
    :class:`GuestTimeout` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if dom.isActive() and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING:
            return
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise GuestError(f"restore --live ended ({proc.returncode}): {err}")
        time.sleep(0.05)
    raise GuestTimeout(f"the domain did not run within {timeout} s")


def finish_live_restore(proc: subprocess.Popen[str], timeout: float = 600) -> dict[str, Any]:
    """Wait for the command; its JSON document. :class:`GuestError` unless it succeeded
    without a traceback and its last progress line reports the whole copy."""
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0 or "Traceback" in err:
        raise GuestError(f"restore --live failed ({proc.returncode}): {err}")
    progress = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    if not progress or progress[-1]["copied_bytes"] != progress[-1]["total_bytes"]:
        raise GuestError(f"restore --live ended before its copy did: {progress[-1:]}")
    document: dict[str, Any] = json.loads(out)
    return document


def stop(proc: subprocess.Popen[str]) -> None:
    """Kill the command (by its pid) if it still runs."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def guest_md5(guest: Guest, offset: int, length: int, dev: str = "/dev/vda",
              timeout: float = 120) -> str:
    """The md5 of ``length`` bytes at ``offset`` of ``dev`` as the guest reads them (busybox
    ``dd`` with O_DIRECT: from the disk, not the guest's page cache)."""
    if offset % BLOCK or length % BLOCK:
        raise ValueError(f"offset and length are multiples of {BLOCK}: {offset}, {length}")
    out = guest.check(f"dd if={dev} bs={BLOCK} skip={offset // BLOCK} count={length // BLOCK} "
                      "iflag=direct 2>/dev/null | md5sum", timeout=timeout)
    return out.split()[0]
