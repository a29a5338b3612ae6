"""Section ``incremental``: a full backup of vdb, 1% of it rewritten by the guest side, an
incremental through the API; then as much again rewritten and an incremental through the
``rdm-backup`` command (a whole process)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tools.bench.common import (
    DISK,
    WRITE,
    Lab,
    MiB,
    Taken,
    dirty_offsets,
    goal,
    median,
    print_verified,
    remove_tree,
    rewrite,
    same_content,
    say,
    settle,
    timed_backup,
)
from tools.labkit import rdm_backup_argv


def cli_backup(domain: str, repo: Path, level: str) -> float:
    """The ``rdm-backup`` command (a whole process) backing up vdb at ``level``."""
    argv = rdm_backup_argv()
    argv += ["--json", "backup", domain, "--target", str(repo), "--disk", DISK,
             "--level", level]
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"rdm-backup backup --level {level} failed: {proc.stderr.strip()}")
    reported = json.loads(proc.stdout)["level"]
    if reported != level:
        raise RuntimeError(f"rdm-backup backup --level {level} made a {reported} backup")
    return seconds


def section_incremental(lab: Lab) -> dict[str, Any]:
    """Full, 1% rewritten, incremental (API); then 1% more and incremental (command)."""
    args = lab.args
    assert lab.dom is not None
    repo = lab.work / "rdmb-inc-repo"
    fulls: list[Taken] = []
    incs: list[Taken] = []
    cli_runs: list[float] = []
    dirty = writes = 0
    verified: bool | None = None
    try:
        for round_no in range(args.repeat):
            settle(args)
            full = timed_backup(lab.name, repo, "full")
            offsets = dirty_offsets(lab.size, args.dirty, f"rdmb-dirty-{args.seed}-{round_no}")
            dirty, writes = rewrite(lab.dom, offsets, 0x40 + round_no), len(offsets)
            settle(args)
            inc = timed_backup(lab.name, repo, "incremental")
            say(f"incremental round {round_no + 1}/{args.repeat}: full {full.seconds:.2f} s, "
                f"{writes} x 64 KiB rewritten, incremental {inc.seconds:.3f} s, "
                f"stored {inc.stored_bytes / MiB:.2f} MiB")
            if round_no == 0 and not args.no_verify:
                verified = same_content(lab.device, inc.image, "qcow2")
            more = dirty_offsets(lab.size, args.dirty, f"rdmb-dirty-cli-{args.seed}-{round_no}")
            rewrite(lab.dom, more, 0x60 + round_no)
            settle(args)
            cli_runs.append(cli_backup(lab.name, repo, "incremental"))
            say(f"incremental round {round_no + 1}/{args.repeat}: rdm-backup command "
                f"{cli_runs[-1]:.3f} s")
            fulls.append(full)
            incs.append(inc)
    finally:
        remove_tree(repo)
    full_s = median([t.seconds for t in fulls])
    inc_s = median([t.seconds for t in incs])
    stored = int(median([float(t.stored_bytes) for t in incs]))
    lab.full_s = full_s
    return {
        "dirty_fraction": args.dirty,
        "dirty_writes": writes,
        "write_bytes": WRITE,
        "dirty_bytes": dirty,
        "incremental_full_s": round(full_s, 3),
        "incremental_s": round(inc_s, 3),
        "incremental_ratio_to_full": round(inc_s / full_s, 4),
        "incremental_stored_bytes": stored,
        "incremental_manifest_stored_bytes":
            int(median([float(t.manifest_stored_bytes) for t in incs])),
        "incremental_bytes_transferred":
            int(median([float(t.bytes_transferred) for t in incs])),
        "incremental_stored_ratio_to_dirty": round(stored / dirty, 4),
        "incremental_cli_s": round(median(cli_runs), 3),
        "ratio_inc_cli_vs_api": round(median(cli_runs) / inc_s, 3),
        "incremental_verified_identical": verified,
        "incremental_runs_s": {
            "full": [round(t.seconds, 3) for t in fulls],
            "incremental": [round(t.seconds, 3) for t in incs],
            "incremental_cli": [round(v, 3) for v in cli_runs],
        },
    }


def print_incremental(doc: dict[str, Any]) -> None:
    mib = doc["dirty_bytes"] / MiB
    print(f"== incremental: {doc['dirty_writes']} guest writes of 64 KiB at scattered "
          f"64 KiB-aligned offsets ({mib:.2f} MiB, {doc['dirty_fraction']:.0%} of the LUN) "
          "between a full and an incremental backup of vdb")
    runs = doc["incremental_runs_s"]
    print(f"  full (api.backup level=full):          {doc['incremental_full_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['full'])}")
    print(f"  incremental (api.backup):              {doc['incremental_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['incremental'])}")
    print(f"  incremental (rdm-backup command):      {doc['incremental_cli_s']:8.3f} s   "
          f"runs {', '.join(f'{v:.3f}' for v in runs['incremental_cli'])}")
    print(f"  incremental time / full time:          {goal(doc, 'incremental_ratio_to_full')}")
    print(f"  command / API (the same incremental):  {goal(doc, 'ratio_inc_cli_vs_api')}")
    print(f"  stored by the incremental:             "
          f"{doc['incremental_stored_bytes'] / MiB:8.3f} MiB on disk (manifest: "
          f"{doc['incremental_manifest_stored_bytes'] / MiB:.3f} MiB, copied "
          f"{doc['incremental_bytes_transferred'] / MiB:.3f} MiB)")
    print(f"  stored / rewritten bytes:              "
          f"{goal(doc, 'incremental_stored_ratio_to_dirty')}")
    print_verified(doc, "incremental_verified_identical", "chain (full + incremental)")
    print()
