"""``restore --live``: a shut-off domain started on its backup while the data flows back."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from libvirt_rdm_backup import api
from libvirt_rdm_backup.cli.output import EXIT_OK, emit, human_size, progress_printer
from libvirt_rdm_backup.errors import UsageError

REPORT_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


def cmd_live_restore(args: argparse.Namespace) -> int:
    """Start the domain on its backup, copy each disk back, switch it onto its source."""
    for option, given in (("--force", args.force), ("--dry-run", args.dry_run),
                          ("--define", args.define), ("--start", args.start)):
        if given:
            raise UsageError(f"restore: {option} does not apply to --live, which writes each "
                             "disk back onto its own source")
    started = time.monotonic()

    def running() -> None:
        seconds = round(time.monotonic() - started, 3)
        sys.stderr.write(json.dumps({"domain": args.domain, "running_after_seconds": seconds})
                         if args.json else f"rdm-backup: {args.domain} runs on its backup "
                         f"after {seconds:.1f} s; copying it back")
        sys.stderr.write("\n")
        sys.stderr.flush()

    result = api.live_restore(args.domain, args.target, backup_id=args.backup,
                              disks=args.disk, uri=args.connect, tls_dir=args.tls_creds,
                              bwlimit=args.bwlimit, progress=live_progress(args.json),
                              running=running)

    def text() -> str:
        lines = [f"{result.domain_name} restored live from backup {result.backup_id}: "
                 f"running after {result.running_after:.1f} s, copied back in "
                 f"{result.seconds:.1f} s"]
        lines += [f"  {d.disk:8} {human_size(d.copied):>10} onto {d.to}" for d in result.disks]
        return "\n".join(lines) + "\n"

    if not args.json and sys.stderr.isatty():
        sys.stderr.write("\n")
    emit(args, result.to_dict(), text)
    return EXIT_OK


def live_progress(as_json: bool) -> Callable[[str, int, int], None]:
    """Progress on stderr: a bar on a terminal, else a line (``--json``: a JSON object) per
    disk every few seconds, with bytes copied back, the total and the ETA."""
    if not as_json:
        bar = progress_printer()
        if bar is not None:
            return bar
    started = time.monotonic()
    shown: dict[str, float] = {}

    def show(disk: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - shown.get(disk, 0.0) < REPORT_EVERY and done < total:
            return
        shown[disk] = now
        rate = done / max(now - started, 1e-3)
        eta = round((total - done) / rate) if rate > 0 and total >= done else None
        if as_json:
            line = json.dumps({"disk": disk, "copied_bytes": done, "total_bytes": total,
                               "eta_seconds": eta})
        else:
            line = (f"rdm-backup: {disk}: {human_size(done)} of {human_size(total)} copied "
                    f"back, ETA {'?' if eta is None else eta} s")
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show
