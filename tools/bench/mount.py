"""Section ``mount``: how soon ``rdm-backup mount`` has a backup point's filesystem mounted,
with the digests of its layers checked first (the default) and without (``--no-verify``).

A LUN of its own: a file of ``--size-mib`` with a GPT and one ext4 partition (``sfdisk``,
``mkfs.ext4`` on a loop device over the partition's range), holding a file of ``--fill`` of the
LUN's size of random data and a few small files, unmounted; a loop device over the whole file
is ``vdb`` of a firmware-only domain; one full backup (not measured). Then ``--repeat``
rounds, each of both ways in a rotated order, each after the page-cache drop, into a fresh
empty directory:

- ``rdm-backup mount DOMAIN --target REPO --disk vdb [--no-verify] --json MOUNTPOINT`` timed
  until the command returns (it returns once the filesystems are mounted);
- a small file's content checked and (the first round's verified mount, unless the bench's
  ``--no-verify``) the md5 of the big file against the original's (not timed);
- ``rdm-backup umount MOUNTPOINT`` timed.

Reported: medians of the mount's ready time both ways and of the umount. No goal.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from libvirt_rdm_backup import api
from tools.bench.common import (
    DISK,
    Lab,
    MiB,
    median,
    remove_tree,
    say,
    settle,
)
from tools.labkit import (
    REPO_ROOT,
    block_disk,
    loop_device,
    rdm_backup_argv,
    test_domain,
    unique_name,
)

MOUNT_METHODS = ("mount_s", "mount_no_verify_s")
SMALL_FILES = {"hello.txt": "rdmb bench mount\n", "etc/motd": "a small file\n",
               "notes/a.txt": "first\n", "notes/b.txt": "second\n"}
BIG_FILE = "data.bin"
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"  # GPT type: Linux filesystem data
TIMEOUT = 1800.0  # seconds a mount (it reads every layer to check its digest) may take


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def rdm_backup_cli(*args: str) -> tuple[float, str]:
    """The ``rdm-backup`` command (this tree's library) timed as a whole; (seconds, stdout)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    started = time.monotonic()
    proc = subprocess.run([*rdm_backup_argv(), *args], capture_output=True, text=True,
                          check=False, timeout=TIMEOUT, env=env)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"rdm-backup {args[0]} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()}")
    return seconds, proc.stdout


def make_ext4_lun(path: Path, size: int, fill: float, work: Path) -> tuple[int, str]:
    """A GPT with one ext4 partition holding the big file and the small ones; (the big
    file's bytes, its md5)."""
    with path.open("wb") as stream:
        stream.truncate(size)
    _run("sh", "-c", f"printf 'label: gpt\\nstart=2048, type={LINUX_FS}\\n' | sfdisk -q {path}")
    table = json.loads(_run("sfdisk", "--json", str(path)))["partitiontable"]
    part = table["partitions"][0]
    sector = int(table.get("sectorsize", 512))
    fs_dir = work / "rdmb-mount-fill"
    fs_dir.mkdir()
    try:
        with loop_device(path, offset=part["start"] * sector,
                         sizelimit=part["size"] * sector) as device:
            _run("mkfs.ext4", "-q", "-F", device)
            _run("mount", device, str(fs_dir))
            try:
                for name, text in SMALL_FILES.items():
                    (fs_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    (fs_dir / name).write_text(text)
                free = os.statvfs(fs_dir).f_bavail * os.statvfs(fs_dir).f_frsize
                count = min(round(fill * size / MiB), int(free * 0.9) // MiB)
                _run("dd", "if=/dev/urandom", f"of={fs_dir / BIG_FILE}", "bs=1M",
                     f"count={count}", "iflag=fullblock", "conv=fsync", "status=none")
                digest = _run("md5sum", str(fs_dir / BIG_FILE)).split()[0]
            finally:
                _run("umount", str(fs_dir))
    finally:
        fs_dir.rmdir()
    os.sync()
    return count * MiB, digest


def mount_round(lab: Lab, repo: Path, key: str, mountpoint: Path,
                digest: str | None) -> tuple[float, float, dict[str, Any]]:
    """One mount (timed), its checks, its umount (timed); (mount s, umount s, checks)."""
    extra = ["--no-verify"] if key == "mount_no_verify_s" else []
    mountpoint.mkdir()
    settle(lab.args)
    mount_s, out = rdm_backup_cli("mount", lab.name, "--target", str(repo), "--disk", DISK,
                                  *extra, "--json", str(mountpoint))
    try:
        listing = json.loads(out)
        fs = Path(listing["partitions"][0]["path"])
        checks: dict[str, Any] = {
            "mounted": [p["mounted"] for p in listing["partitions"]],
            "verified": listing["verified"],
            "small_files_ok": all((fs / n).read_text() == t for n, t in SMALL_FILES.items()),
        }
        if digest is not None:
            checks["big_file_ok"] = _run("md5sum", str(fs / BIG_FILE)).split()[0] == digest
    finally:
        umount_s, _out = rdm_backup_cli("umount", str(mountpoint))
        mountpoint.rmdir()
    return mount_s, umount_s, checks


def section_mount(lab: Lab) -> dict[str, Any]:
    """Mount and umount of a backup point's ext4 (see the module)."""
    args = lab.args
    paths = {key: lab.work / f"rdmb-mount-{key}" for key in ("lun", "repo")}
    name = unique_name("rdmb-bench-mount")
    runs: dict[str, list[float]] = {key: [] for key in (*MOUNT_METHODS, "umount_s")}
    checks: dict[str, Any] = {}
    try:
        say(f"mount: a GPT with an ext4 partition on {paths['lun']} ({args.size_mib} MiB)")
        data_bytes, digest = make_ext4_lun(paths["lun"], lab.size, args.fill, lab.work)
        with loop_device(paths["lun"]) as loop, \
                test_domain(name, [block_disk(DISK, loop)]):
            api.backup(name, str(paths["repo"]), disks=[DISK], level="full")
            mount_lab = Lab(args, lab.work, lab.size, data_bytes, paths["lun"], loop, name)
            for round_no in range(args.repeat):
                shift = round_no % len(MOUNT_METHODS)
                for key in MOUNT_METHODS[shift:] + MOUNT_METHODS[:shift]:
                    first = round_no == 0 and key == "mount_s" and not args.no_verify
                    mount_s, umount_s, found = mount_round(
                        mount_lab, paths["repo"], key, lab.work / f"rdmb-mnt-{round_no}-{key}",
                        digest if first else None)
                    runs[key].append(mount_s)
                    runs["umount_s"].append(umount_s)
                    checks.setdefault(key, found)
                    say(f"mount round {round_no + 1}/{args.repeat}: {key}: ready after "
                        f"{mount_s:.2f} s, umount {umount_s:.2f} s")
    finally:
        for path in paths.values():
            remove_tree(path)
    return {
        "mount_point_bytes": lab.size,
        "mount_data_bytes": data_bytes,
        "mount_domain": name,
        **{key: round(median(values), 3) for key, values in runs.items()},
        "mount_checks": checks,
        "mount_verified_identical": checks["mount_s"].get("big_file_ok"),
        "mount_runs_s": {key: [round(v, 3) for v in values] for key, values in runs.items()},
    }


def print_mount(doc: dict[str, Any]) -> None:
    gib = doc["mount_point_bytes"] / (1024 * MiB)
    runs = doc["mount_runs_s"]
    print(f"== mount: rdm-backup mount of vdb's full backup ({gib:.2f} GiB point, GPT, one "
          f"ext4 with {doc['mount_data_bytes'] / MiB:.0f} MiB of random data), timed until "
          "the command returned")
    print(f"  ready after (digests checked):   {doc['mount_s']:8.3f} s   runs "
          f"{', '.join(f'{v:.2f}' for v in runs['mount_s'])}")
    print(f"  ready after (--no-verify):       {doc['mount_no_verify_s']:8.3f} s   runs "
          f"{', '.join(f'{v:.2f}' for v in runs['mount_no_verify_s'])}")
    print(f"  umount:                          {doc['umount_s']:8.3f} s   runs "
          f"{', '.join(f'{v:.2f}' for v in runs['umount_s'])}")
    checks = doc["mount_checks"]
    small = all(c["small_files_ok"] for c in checks.values())
    print(f"  small files read back: {'correct' if small else 'WRONG'}", end="")
    if doc["mount_verified_identical"] is not None:
        same = "identical" if doc["mount_verified_identical"] else "DIFFERENT"
        print(f"; first mount's big file vs the original (md5): {same}", end="")
    print()
    print()
