"""``backup``, ``restore``, ``verify`` and ``list``: the commands on a repository."""

from __future__ import annotations

import argparse
import sys

from libvirt_rdm_backup import api
from libvirt_rdm_backup.cli.fleet import check_usage, cmd_backup_all
from libvirt_rdm_backup.cli.live import cmd_live_restore
from libvirt_rdm_backup.cli.output import (
    EXIT_OK,
    EXIT_VERIFY,
    emit,
    human_size,
    one_line,
    progress_printer,
)
from libvirt_rdm_backup.cli.prune import backup_retention
from libvirt_rdm_backup.engine.restore_all import DisksRequest
from libvirt_rdm_backup.errors import DamagedBackupError, UsageError


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up one domain (or every domain: ``--all``); ``--prune`` then prunes its chain."""
    check_usage(args)
    retention = backup_retention(args)
    if args.all:
        return cmd_backup_all(args, args.backup_parser)
    result = api.backup(args.domain, args.target, args.disk or None, args.connect,
                        None if args.json else progress_printer(), level=args.level,
                        chain=args.chain, quiesce=args.quiesce,
                        allow_plain_nbd=args.allow_plain_nbd, tls_dir=args.tls_creds,
                        agent=args.agent, agent_identity=args.agent_identity,
                        agent_known_hosts=args.agent_known_hosts,
                        max_pause=args.max_pause, bwlimit=args.bwlimit, retention=retention,
                        compress=args.compress, encrypt_key_file=args.encrypt_key_file)
    document = result.to_dict()

    def text() -> str:
        m = result.manifest
        pause = m.consistency.get("paused_ms")
        lines = [f"backup {m.backup_id} of {m.domain_name} ({m.level}) published at {result.path}",
                 f"  consistency: {m.consistency.get('method')}"
                 + (f", guest held {pause} ms" if pause else "")]
        lines += [f"  note: {note}" for note in m.consistency.get("notes", [])]
        for d in m.disks:
            lines.append(f"  {d.disk.target:8} {d.level:12} {human_size(d.size):>10}  data "
                         f"{human_size(d.bytes_transferred)}  stored "
                         f"{human_size(d.stored_bytes)}  via {d.data_path}: {d.reason}")
        return "\n".join(lines) + "\n"

    if not args.json and sys.stderr.isatty():
        sys.stderr.write("\n")
    emit(args, document, text)
    return EXIT_OK


def _restore_request(args: argparse.Namespace) -> DisksRequest | None:
    """The multi-disk request of ``restore`` (None: the one disk to ``--to``); UsageError for
    options that do not combine."""
    if args.to is not None:
        if args.all_disks or not args.disk or len(args.disk) > 1:
            raise UsageError("restore: --to writes one disk: give exactly one --disk DEV "
                             "(--to-dir or --to-original for more)")
        for option, given in (("--dry-run", args.dry_run), ("--define", args.define),
                              ("--start", args.start)):
            if given:
                raise UsageError(f"restore: {option} works with --to-dir or --to-original")
        return None
    if not args.disk and not args.all_disks and args.define is None:
        raise UsageError("restore: give --disk DEV or --all-disks")
    request = DisksRequest(disks=tuple(args.disk) if args.disk else None, to_dir=args.to_dir,
                           to_original=args.to_original, dry_run=args.dry_run,
                           force=args.force, define=args.define, start=args.start)
    if request.to_dir is not None and request.force:
        raise UsageError("restore: --force works with --to and --to-original")
    request.check()
    return request


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore one disk to ``--to``, or several to ``--to-dir`` or their original devices,
    or (``--live``) start a shut-off domain on its backup."""
    if args.live:
        if args.encrypt_key_file:
            raise UsageError("restore --live does not read encrypted backups")
        return cmd_live_restore(args)
    request = _restore_request(args)
    if request is not None:
        return _restore_many(args, request)
    result = api.restore(args.domain, args.target, args.disk[0], args.to,
                         backup_id=args.backup, force=args.force, uri=args.connect,
                         tls_dir=args.tls_creds, bwlimit=args.bwlimit,
                         progress=None if args.json else progress_printer(),
                         encrypt_key_file=args.encrypt_key_file)
    emit(args, result.to_dict(), lambda: (
        f"restored {result.disk} of backup {result.backup_id} to {result.path} "
        f"({human_size(result.size)}, {human_size(result.data_bytes)} data)\n"))
    return EXIT_OK


def _restore_many(args: argparse.Namespace, request: DisksRequest) -> int:
    result = api.restore_many(args.domain, args.target, request, backup_id=args.backup,
                              uri=args.connect, tls_dir=args.tls_creds, bwlimit=args.bwlimit,
                              progress=None if args.json or request.dry_run
                              else progress_printer(), encrypt_key_file=args.encrypt_key_file)

    def text() -> str:
        verb = "would restore" if result.dry_run else "restored"
        lines = [f"{verb} {d.disk} of backup {result.backup_id} to {d.path} "
                 f"({human_size(d.size)}"
                 + (f", {human_size(d.data_bytes)} data" if d.data_bytes is not None else "")
                 + ")" + (f", matched on {d.matched_on}" if d.matched_on else "")
                 for d in result.disks]
        lines += [f"note: {note}" for note in result.notes]
        if result.defined:
            lines.append(f"defined domain {result.defined}"
                         + (" and started it" if result.started else ""))
        return "\n".join(lines) + "\n"

    if not args.json and not request.dry_run and sys.stderr.isatty():
        sys.stderr.write("\n")
    emit(args, result.to_dict(), text)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify stored digests."""
    report = api.verify(args.target, args.domain, args.backup, tls_dir=args.tls_creds,
                        deep=args.deep, encrypt_key_file=args.encrypt_key_file)

    def text() -> str:
        lines = [f"{c.backup_id} {c.disk or '-'}: " + ("ok" if c.ok else f"FAILED: {c.problem}")
                 for c in report.checks]
        return "\n".join(lines) + "\n"

    emit(args, report.to_dict(), text)
    if not report.ok:
        bad = next(c for c in report.checks if not c.ok)
        where = f"backup {bad.backup_id}" + (f" disk {bad.disk}" if bad.disk else "")
        failed = sum(1 for c in report.checks if not c.ok)
        more = f" (and {failed - 1} more failed)" if failed > 1 else ""
        sys.stderr.write("rdm-backup: verification failed: "
                         + one_line(f"{where}: {bad.problem}{more}") + "\n")
        return EXIT_VERIFY
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """List published backups; a damaged one is named on stderr (exit 5), the rest listed."""
    damaged = api.damaged_backups(args.target, args.domain, tls_dir=args.tls_creds)
    try:
        manifests = api.list_backups(args.target, args.domain, tls_dir=args.tls_creds)
    except DamagedBackupError:
        if not damaged:
            raise
        manifests = []  # every backup of the domain is damaged
    document = [
        {
            "backup_id": m.backup_id,
            "domain_uuid": m.domain_uuid,
            "domain_name": m.domain_name,
            "level": m.level,
            "chain": m.chain,
            "parent": m.parent,
            "sequence": m.sequence,
            "created": m.created,
            "completed": m.completed,
            "disks": [{"disk": d.disk.target, "size": d.size, "level": d.level,
                       "stored_bytes": d.stored_bytes} for d in m.disks],
        }
        for m in manifests
    ]
    emit(args, document, lambda: "".join(
        f"{m.backup_id}  {m.domain_name:20} {m.level:12} {m.created}  "
        f"{','.join(d.disk.target for d in m.disks)}\n" for m in manifests))
    if damaged:
        first = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        sys.stderr.write("rdm-backup: error: " + one_line(
            f"backup {first.backup_id} of domain {first.domain_uuid} is damaged and not "
            f"listed{more}: {first.problem}") + "\n")
        return EXIT_VERIFY
    return EXIT_OK
