"""``rdm-backup``: argparse → API → text or ``--json``. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from libvirt_rdm_backup import api, retry
from libvirt_rdm_backup.engine.paused_copy import DEFAULT_MAX_PAUSE, check_max_pause
from libvirt_rdm_backup.errors import DamagedBackupError, RdmBackupError, UsageError
from libvirt_rdm_backup.modes import Level, Quiesce
from libvirt_rdm_backup.qemu.block_copy import bwlimit_speed
from libvirt_rdm_backup.redact import printable, redact
from libvirt_rdm_backup.repository.chain import DEFAULT_CHAIN

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 4
EXIT_VERIFY = 5


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> Any:
        command = self.prog.removeprefix("rdm-backup").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        return check_max_pause(float(text))
    except (ValueError, UsageError) as err:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}") from err


def _mib_per_s(text: str) -> float:
    """A positive number of MiB/s (argparse type)."""
    try:
        value = float(text)
        bwlimit_speed(value)
    except (ValueError, UsageError) as err:
        raise argparse.ArgumentTypeError(f"not a positive number of MiB/s: {text!r}") from err
    return value


BWLIMIT_HELP = ("copy each disk at most this fast, in MiB/s (QEMU's block jobs: the guest's "
                "and those of the private storage daemon; default: no limit)")


def _human_size(value: int | None) -> str:
    if value is None:
        return "?"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def _emit(args: argparse.Namespace, document: Any, text: Callable[[], str]) -> None:
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:  # names read back (domains, disks, backups) reach the terminal as text only
        sys.stdout.write(printable(text()))


def cmd_disks(args: argparse.Namespace) -> int:
    """List raw disks (with identifiers and mapping) and the disks that are not raw."""
    report = api.describe(args.domain, args.connect)
    inventory, mappings = report.inventory, report.mappings
    document = {
        "domain_name": inventory.domain_name,
        "domain_uuid": inventory.domain_uuid,
        "running": inventory.running,
        "raw_disks": [
            {**d.to_dict(),
             "mapping": m.to_dict() if (m := mappings.get(d.target)) else None,
             "mapping_error": report.mapping_errors.get(d.target),
             "paused_copy": report.paused_copies.get(d.target)}
            for d in inventory.raw
        ],
        "other_disks": [d.to_dict() for d in inventory.other],
    }

    def text() -> str:
        lines = [f"domain {inventory.domain_name} ({inventory.domain_uuid}), "
                 f"{'running' if inventory.running else 'shut off'}"]
        for d in inventory.raw:
            lines.append(
                f"  {d.target:8} raw  {d.source_kind}/{d.device:4} {_human_size(d.size):>10}  "
                f"{d.source}" + (f"  serial={d.serial}" if d.serial else "")
            )
            mapping = mappings.get(d.target)
            if d.target in report.mapping_errors:
                lines.append(f"           -> no mapping: {report.mapping_errors[d.target]}")
            if d.target in report.paused_copies:
                lines.append(f"           -> copied while the guest is paused: "
                             f"{report.paused_copies[d.target]}")
            if mapping is not None:
                for node, offset, length in mapping.root.leaves():
                    lines.append(f"           -> {node.kind} {node.path or node.name} "
                                 f"offset {offset} length {length}")
        for o in inventory.other:
            lines.append(f"  {o.target:8} not raw: {o.reason}")
        return "\n".join(lines) + "\n"

    _emit(args, document, text)
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    """Print the raw disk mapping documents."""
    mappings = api.map_disks(args.domain, args.disk or None, args.connect)
    document = [m.to_dict() for m in mappings]
    _emit(args, document, lambda: json.dumps(document, indent=2) + "\n")
    return EXIT_OK


def _progress_printer() -> Callable[[str, int, int], None] | None:
    """A one-line progress bar on a terminal: done/total over all jobs, rate and ETA."""
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()
    jobs: dict[str, tuple[int, int]] = {}

    def show(job: str, done: int, total: int) -> None:
        jobs[job] = (done, total)
        all_done = sum(d for d, _ in jobs.values())
        all_total = sum(t for _, t in jobs.values()) or 1
        elapsed = max(time.monotonic() - started, 1e-3)
        rate = all_done / elapsed
        eta = (all_total - all_done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * all_done / all_total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {_human_size(all_done)} / "
            f"{_human_size(all_total)}  {_human_size(int(rate))}/s  ETA {eta:4.0f} s ")
        sys.stderr.flush()

    return show


def cmd_backup(args: argparse.Namespace) -> int:
    """Take a full backup."""
    result = api.backup(args.domain, args.target, args.disk or None, args.connect,
                        None if args.json else _progress_printer(), level=args.level,
                        chain=args.chain, quiesce=args.quiesce,
                        allow_plain_nbd=args.allow_plain_nbd, tls_dir=args.tls_creds,
                        agent=args.agent, agent_identity=args.agent_identity,
                        agent_known_hosts=args.agent_known_hosts,
                        max_pause=args.max_pause, bwlimit=args.bwlimit)
    document = result.to_dict()

    def text() -> str:
        m = result.manifest
        pause = m.consistency.get("paused_ms")
        lines = [f"backup {m.backup_id} of {m.domain_name} ({m.level}) published at {result.path}",
                 f"  consistency: {m.consistency.get('method')}"
                 + (f", guest held {pause} ms" if pause else "")]
        lines += [f"  note: {note}" for note in m.consistency.get("notes", [])]
        for d in m.disks:
            lines.append(f"  {d.disk.target:8} {d.level:12} {_human_size(d.size):>10}  data "
                         f"{_human_size(d.bytes_transferred)}  stored "
                         f"{_human_size(d.stored_bytes)}  via {d.data_path}: {d.reason}")
        return "\n".join(lines) + "\n"

    if not args.json and sys.stderr.isatty():
        sys.stderr.write("\n")
    _emit(args, document, text)
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore one disk."""
    result = api.restore(args.domain, args.target, args.disk, args.to,
                         backup_id=args.backup, force=args.force, uri=args.connect,
                         tls_dir=args.tls_creds, bwlimit=args.bwlimit,
                         progress=None if args.json else _progress_printer())
    _emit(args, result.to_dict(), lambda: (
        f"restored {result.disk} of backup {result.backup_id} to {result.path} "
        f"({_human_size(result.size)}, {_human_size(result.data_bytes)} data)\n"))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify stored digests."""
    report = api.verify(args.target, args.domain, args.backup, tls_dir=args.tls_creds)

    def text() -> str:
        lines = [f"{c.backup_id} {c.disk or '-'}: " + ("ok" if c.ok else f"FAILED: {c.problem}")
                 for c in report.checks]
        return "\n".join(lines) + "\n"

    _emit(args, report.to_dict(), text)
    if not report.ok:
        bad = next(c for c in report.checks if not c.ok)
        where = f"backup {bad.backup_id}" + (f" disk {bad.disk}" if bad.disk else "")
        failed = sum(1 for c in report.checks if not c.ok)
        more = f" (and {failed - 1} more failed)" if failed > 1 else ""
        sys.stderr.write("rdm-backup: verification failed: "
                         + _one_line(f"{where}: {bad.problem}{more}") + "\n")
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
    _emit(args, document, lambda: "".join(
        f"{m.backup_id}  {m.domain_name:20} {m.level:12} {m.created}  "
        f"{','.join(d.disk.target for d in m.disks)}\n" for m in manifests))
    if damaged:
        first = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        sys.stderr.write("rdm-backup: error: " + _one_line(
            f"backup {first.backup_id} of domain {first.domain_uuid} is damaged and not "
            f"listed{more}: {first.problem}") + "\n")
        return EXIT_VERIFY
    return EXIT_OK


def _common_options(default: Any) -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=default,
                        help="print one JSON document on stdout")
    common.add_argument("-c", "--connect", metavar="URI", default=default,
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI or qemu:///system)")
    common.add_argument("-v", "--verbose", action="count", default=default,
                        help="more log output")
    return common


def cmd_hook(args: argparse.Namespace) -> int:
    """Install or remove the libvirt hook that records VM starts and stops."""
    from libvirt_rdm_backup import hook

    if args.action == "install":
        message = hook.install(args.hooks_dir, state_dir=args.state_dir)
        document: dict[str, Any] = {"installed": True, "hooks_dir": args.hooks_dir,
                                    "message": message}
    else:
        removed = hook.uninstall(args.hooks_dir)
        message = "hook removed" if removed else "no hook was installed"
        document = {"installed": False, "removed": removed, "hooks_dir": args.hooks_dir,
                    "message": message}
    _emit(args, document, lambda: message + "\n")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Serve a point in time of raw disks over NBD until SIGINT, SIGTERM or --timeout."""
    if args.chain is not None and args.target is None:
        raise UsageError("export: --chain needs --target")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("export: --timeout must be a positive number of seconds")
    stop: list[str] = []

    def note(signum: int, _frame: object) -> None:
        stop.append(signal.Signals(signum).name)

    # from here on a signal only ends the wait: the teardown always runs to its end
    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with api.export(args.domain, args.disk, socket=args.socket, listen=args.listen,
                        target=args.target, chain=args.chain or DEFAULT_CHAIN,
                        uri=args.connect, allow_remote=args.allow_remote,
                        scratch_dir=args.scratch_dir) as handle:
            if args.json:
                sys.stdout.write(json.dumps(handle.to_dict()) + "\n")
            else:
                until = f" (or {args.timeout:g} s)" if args.timeout else ""
                lines = [f"exporting {', '.join(handle.uris)} of {handle.domain_name} at "
                         f"{handle.point_in_time}, read-only, until SIGINT or SIGTERM{until}"]
                for d in handle.disks:
                    lines.append(f"  {d.disk:8} {d.uri}")
                    if d.bitmap_context:
                        lines.append(f"           writes since backup {d.dirty_since}: "
                                     f"{d.bitmap_context}")
                    elif d.bitmap_note:
                        lines.append(f"           no dirty bitmap: {d.bitmap_note}")
                sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            next_check = time.monotonic() + 1.0

            def stopped() -> bool:
                nonlocal next_check
                if not stop and time.monotonic() >= next_check:
                    handle.check()  # a failed fleecing job: the point in time is gone
                    next_check = time.monotonic() + 1.0
                return bool(stop)

            retry.serve_until_stopped(args.timeout)(stopped)
            reason = stop[0] if stop else f"timeout after {args.timeout:g} s"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if not args.json:
        sys.stdout.write(f"stopped ({reason}): the export is torn down\n")
    return EXIT_OK


def cmd_receive(args: argparse.Namespace) -> int:
    """Serve a backup volume over NBD (the backup-server side of NBD targets)."""
    from libvirt_rdm_backup.targets import receive

    address = receive.parse_listen(args.listen, args.socket, args.export,
                                   tls=args.tls_creds is not None)
    config = receive.ReceiveConfig(volume=os.path.abspath(args.volume), address=address,
                                   size=args.size, tls_dir=args.tls_creds,
                                   allow_plain_remote=args.allow_plain_remote,
                                   client_dns=tuple(args.allow_client_dn or ()))
    document = {"uri": address.uri, "volume": config.volume}

    def ready() -> None:  # one line once the export exists: clients may connect at once
        sys.stdout.write(json.dumps(document) + "\n" if args.json
                         else f"serving {config.volume} as {address.uri}\n")
        sys.stdout.flush()

    return receive.serve(config, ready)


def cmd_agent(args: argparse.Namespace) -> int:
    """The hypervisor side of remote backups: one JSON request on stdin, one answer line."""
    from libvirt_rdm_backup import agent

    return agent.main()


TLS_HELP = ("for nbds:// targets: x509 directory with ca-cert.pem, client-cert.pem, "
            "client-key.pem (readable by QEMU's user on the hypervisor)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rdm-backup``."""
    parser = _Parser(prog="rdm-backup", parents=[_common_options(argparse.SUPPRESS)],
                     description="Backup and restore of raw disks of libvirt/QEMU domains.")
    parser.set_defaults(json=False, connect=None, verbose=0)
    # the options work before and after the command; the command's copy must not
    # reset what was given before it, hence SUPPRESS defaults on both copies
    common = _common_options(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("disks", parents=[common], help="list a domain's disks and raw disks")
    p.add_argument("domain", help="domain name or UUID")
    p.set_defaults(func=cmd_disks)

    p = sub.add_parser("map", parents=[common], help="print the raw disk mapping")
    p.add_argument("domain", help="domain name or UUID")
    p.add_argument("--disk", action="append", metavar="DEV", help="only this disk (repeatable)")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("backup", parents=[common], help="back up a domain's raw disks")
    p.add_argument("domain", help="domain name or UUID")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory, or an NBD volume: nbd://HOST:PORT/EXPORT, "
                        "nbds://... (TLS), nbd+unix:///EXPORT?socket=PATH")
    p.add_argument("--allow-plain-nbd", action="store_true",
                   help="allow unencrypted nbd:// to a non-loopback address")
    p.add_argument("--agent", metavar="ssh://USER@HOST[:PORT]",
                   help="the hypervisor's rdm-backup agent, when --connect names another "
                        "machine: asked over SSH for the raw disk mappings")
    p.add_argument("--agent-identity", metavar="FILE", help="SSH key for --agent")
    p.add_argument("--agent-known-hosts", metavar="FILE", help="known_hosts for --agent")
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)
    p.add_argument("--disk", action="append", metavar="DEV", help="only this disk (repeatable)")
    p.add_argument("--level", choices=[m.value for m in Level], default="auto",
                   help="full, incremental (since the chain's previous backup), differential "
                        "(since its last full), resync (read once, store the chunks that "
                        "differ from the last backup) or auto (default: incremental where "
                        "tracking is intact, else a resync or a full copy, with the reason)")
    p.add_argument("--quiesce", nargs="?", const="try", choices=[m.value for m in Quiesce],
                   default=None,
                   help="freeze the guest's filesystems through the QEMU guest agent while "
                        "the point in time is fixed; without the agent the backup is "
                        "crash-consistent, or fails with --quiesce=required")
    p.add_argument("--chain", default=DEFAULT_CHAIN, metavar="NAME",
                   help="independent chain with its own dirty tracking (default: %(default)s)")
    p.add_argument("--max-pause", type=_seconds, default=DEFAULT_MAX_PAUSE, metavar="SECONDS",
                   help="longest the guest may stay paused while a passthrough LUN without "
                        "storage snapshots is copied: refused up front when its measured read "
                        "rate says longer, cancelled (guest resumed, exit 4) when reached "
                        "(default: %(default)g)")
    p.add_argument("--bwlimit", type=_mib_per_s, metavar="MIB/S", help=BWLIMIT_HELP)
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", parents=[common], help="restore one disk to a file or device")
    p.add_argument("domain", help="domain UUID, or its name at backup time")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory or NBD volume URI")
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)
    p.add_argument("--disk", required=True, metavar="DEV", help="the disk to restore (e.g. vdb)")
    p.add_argument("--to", required=True, metavar="PATH",
                   help="new file, existing file or block device to write the disk to")
    p.add_argument("--backup", metavar="ID", help="backup id (default: the newest)")
    p.add_argument("--force", action="store_true",
                   help="write even to a smaller target or one used by a running domain")
    p.add_argument("--bwlimit", type=_mib_per_s, metavar="MIB/S",
                   help="write at most this fast, in MiB/s (default: no limit)")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("verify", parents=[common], help="recompute and check stored digests")
    p.add_argument("domain", nargs="?",
                   help="only this domain's backups: its UUID, or its name at backup time")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory or NBD volume URI")
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)
    p.add_argument("--backup", metavar="ID",
                   help="only this backup, with the layers it builds on")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("hook", parents=[common],
                       help="install or remove the libvirt hook that records VM restarts")
    p.add_argument("action", choices=("install", "uninstall"), help="install or remove the hook")
    p.add_argument("--hooks-dir", default="/etc/libvirt/hooks", metavar="DIR",
                   help="libvirt's hook directory (default: %(default)s)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the hook records events (default: "
                        "/var/lib/libvirt-rdm-backup/events)")
    p.set_defaults(func=cmd_hook)

    p = sub.add_parser("export", parents=[common],
                       help="serve a point in time of raw disks over NBD, read-only (pull mode)")
    p.add_argument("domain", help="domain name or UUID")
    p.add_argument("--disk", action="append", required=True, metavar="DEV",
                   help="disk to export (repeatable); its NBD export is named after it")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH",
                       help="unix socket to listen on, mode 0600 (default: a new one in a "
                            "0700 directory under /run/libvirt-rdm-backup)")
    where.add_argument("--listen", metavar="ADDRESS:PORT",
                       help="listen on TCP instead (an IP address, loopback unless "
                            "--allow-remote; port 0: any free port); any local user can connect")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --listen address that is not loopback (NBD without TLS: "
                        "plaintext, no authentication)")
    p.add_argument("--target", metavar="DIR",
                   help="repository: also export the writes since the chain's last backup "
                        "as the NBD metadata context qemu:dirty-bitmap:NAME")
    p.add_argument("--chain", default=None, metavar="NAME",
                   help=f"chain of --target (default: {DEFAULT_CHAIN})")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop after this long (default: at SIGINT or SIGTERM)")
    p.add_argument("--scratch-dir", metavar="DIR",
                   help="where the old data of disk areas the guest overwrites is kept while "
                        "the export runs (default: /var/tmp)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("receive", parents=[common],
                       help="serve a backup volume over NBD for backup --target nbd://...")
    p.add_argument("--volume", required=True, metavar="FILE",
                   help="the volume file (created sparse when missing)")
    p.add_argument("--size", type=int, default=1 << 40, metavar="BYTES",
                   help="size of a new volume (default: 1 TiB, sparse)")
    p.add_argument("--listen", metavar="HOST:PORT", help="TCP address to serve on")
    p.add_argument("--socket", metavar="PATH", help="unix socket to serve on")
    p.add_argument("--export", default="backups", metavar="NAME")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="x509 directory (ca-cert.pem, server-cert.pem, server-key.pem)")
    p.add_argument("--allow-client-dn", action="append", metavar="DN",
                   help="with --tls-creds: allow clients whose certificate has this subject, "
                        "as QEMU writes it (in the certificate's order, RFC 4514 escaping, "
                        "e.g. 'C=GB,O=Example,CN=hv1'); repeatable; default: the subject of "
                        "DIR/client-cert.pem when there is one")
    p.add_argument("--allow-plain-remote", action="store_true",
                   help="allow serving without TLS on a non-loopback address")
    p.set_defaults(func=cmd_receive)

    p = sub.add_parser("agent", parents=[common],
                       help="answer one JSON request of a backup server (run by sshd with a "
                            "forced command; see docs/remote-backups.md)")
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("list", parents=[common], help="list backups in a repository")
    p.add_argument("domain", nargs="?",
                   help="only this domain's backups: its UUID, or its name at backup time")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory or NBD volume URI")
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)
    p.set_defaults(func=cmd_list)
    return parser


def _one_line(text: str) -> str:
    """Errors are one line (messages of tools may hold newlines) and show no URI passwords
    and no control characters."""
    return printable(redact(" ".join(text.split())))


class _RedactingFormatter(logging.Formatter):
    """Log lines show no passwords of URIs (libvirt URIs, tool output, QMP traffic)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(redact(super().format(record)))


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like an interrupt: every cleanup (resume, jobs, nodes) runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command, print one line on error, return the exit code."""
    parser = build_parser()
    verbose = 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = parser.parse_args(argv)
        verbose = args.verbose
        handler = logging.StreamHandler()
        handler.setFormatter(_RedactingFormatter("rdm-backup: %(levelname)s: %(message)s"))
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
            handlers=[handler],
        )
        # qemu.qmp's own lines only at -vv: its failures reach the user as our one-line errors
        logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)
        code: int = args.func(args)
        return code
    except RdmBackupError as err:
        sys.stderr.write(f"rdm-backup: error: {_one_line(str(err))}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("rdm-backup: error: interrupted, the operation did not complete\n")
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - the CLI never shows a traceback
        if verbose:
            raise
        sys.stderr.write(
            f"rdm-backup: internal error: {type(err).__name__}: {_one_line(str(err))}\n")
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
