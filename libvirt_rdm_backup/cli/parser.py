"""The argument parser of ``rdm-backup``: its commands, options and help texts."""

from __future__ import annotations

import argparse
from typing import Any

from libvirt_rdm_backup.cli.backups import cmd_backup, cmd_list, cmd_restore, cmd_verify
from libvirt_rdm_backup.cli.disks import cmd_disks, cmd_map
from libvirt_rdm_backup.cli.fleet import jobs
from libvirt_rdm_backup.cli.host import cmd_agent, cmd_hook
from libvirt_rdm_backup.cli.mounts import cmd_mount, cmd_umount
from libvirt_rdm_backup.cli.prune import add_keep_options, cmd_prune, cmd_rekey
from libvirt_rdm_backup.cli.schedule import cmd_schedule
from libvirt_rdm_backup.cli.serving import cmd_export, cmd_receive, cmd_serve
from libvirt_rdm_backup.engine.paused_copy import DEFAULT_MAX_PAUSE, check_max_pause
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.modes import Compression, Level, Quiesce
from libvirt_rdm_backup.qemu.block_copy import bwlimit_speed
from libvirt_rdm_backup.repository.chain import DEFAULT_CHAIN


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit code 2."""

    def error(self, message: str) -> Any:
        command = self.prog.removeprefix("rdm-backup").strip()
        raise UsageError(f"{command}: {message}" if command else message)


def seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        return check_max_pause(float(text))
    except (ValueError, UsageError) as err:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}") from err


def mib_per_s(text: str) -> float:
    """A positive number of MiB/s (argparse type)."""
    try:
        value = float(text)
        bwlimit_speed(value)
    except (ValueError, UsageError) as err:
        raise argparse.ArgumentTypeError(f"not a positive number of MiB/s: {text!r}") from err
    return value


BWLIMIT_HELP = ("copy each disk at most this fast, in MiB/s (QEMU's block jobs: the guest's "
                "and those of the private storage daemon; a resync's own reads of the disk; "
                "default: no limit)")


def common_options(default: Any) -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=default,
                        help="print one JSON document on stdout")
    common.add_argument("-c", "--connect", metavar="URI", default=default,
                        help="libvirt URI (default: $LIBVIRT_DEFAULT_URI or qemu:///system)")
    common.add_argument("-v", "--verbose", action="count", default=default,
                        help="more log output")
    return common


TLS_HELP = ("for nbds:// targets: x509 directory with ca-cert.pem, client-cert.pem, "
            "client-key.pem (readable by QEMU's user on the hypervisor)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rdm-backup``."""
    parser = Parser(prog="rdm-backup", parents=[common_options(argparse.SUPPRESS)],
                    description="Backup and restore of raw disks of libvirt/QEMU domains.")
    parser.set_defaults(json=False, connect=None, verbose=0)
    # the options work before and after the command; the command's copy must not
    # reset what was given before it, hence SUPPRESS defaults on both copies
    common = common_options(argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    _add_disks(sub, common)
    _add_map(sub, common)
    backup = _add_backup(sub, common)
    _add_restore(sub, common)
    _add_verify(sub, common)
    _add_hook(sub, common)
    _add_export(sub, common)
    _add_receive(sub, common)
    _add_serve(sub, common)
    _add_mount(sub, common)
    _add_agent(sub, common)
    _add_list(sub, common)
    _add_prune(sub, common)
    _add_rekey(sub, common)
    _add_schedule(sub, common, backup)
    return parser


def _add_disks(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``disks`` command."""
    p = sub.add_parser("disks", parents=[common], help="list a domain's disks and raw disks")
    p.add_argument("domain", help="domain name or UUID")
    p.set_defaults(func=cmd_disks)


def _add_map(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``map`` command."""
    p = sub.add_parser("map", parents=[common], help="print the raw disk mapping")
    p.add_argument("domain", help="domain name or UUID")
    p.add_argument("--disk", action="append", metavar="DEV", help="only this disk (repeatable)")
    p.set_defaults(func=cmd_map)


def _add_backup(sub: argparse._SubParsersAction[Parser], common: Parser) -> Parser:
    """The ``backup`` command."""
    p = sub.add_parser("backup", parents=[common],
                       help="back up a domain's raw disks (or those of every domain: --all)")
    p.add_argument("domain", nargs="?", help="domain name or UUID (not with --all)")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory, or an NBD volume: nbd://HOST:PORT/EXPORT, "
                        "nbds://... (TLS), nbd+unix:///EXPORT?socket=PATH; or a Ceph pool: "
                        "rbd://POOL[/PREFIX]?conf=PATH&id=USER")
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
    p.add_argument("--max-pause", type=seconds, default=DEFAULT_MAX_PAUSE, metavar="SECONDS",
                   help="longest the guest may stay paused while a passthrough LUN without "
                        "storage snapshots is copied: refused up front when its measured read "
                        "rate says longer, cancelled (guest resumed, exit 4) when reached "
                        "(default: %(default)g)")
    p.add_argument("--bwlimit", type=mib_per_s, metavar="MIB/S", help=BWLIMIT_HELP)
    p.add_argument("--compress", nargs="?", const="zstd", default=None,
                   choices=[m.value for m in Compression],
                   help="write the new layers' clusters compressed by QEMU (qcow2 "
                        "compression_type zstd, the default, or zlib)")
    add_key_option(p, "encrypt the new layers (qcow2 LUKS) with the key this file holds; "
                      "an encrypted repository takes encrypted backups with its key only")
    p.add_argument("--prune", action="store_true",
                   help="after the backup, prune its chain by the --keep-* options "
                        "(see prune)")
    add_keep_options(p, "(with --prune)")
    p.add_argument("--all", action="store_true",
                   help="every domain of the connection (running or shut off) that has raw "
                        "disks, each into the one repository; domains without raw disks are "
                        "listed as skipped (no --disk)")
    p.add_argument("--jobs", type=jobs, metavar="N",
                   help="with --all: back up at most N domains at once (default: 1; one at a "
                        "time to an NBD volume)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="with --all: leave out the domains whose name or UUID matches this "
                        "shell pattern (fnmatch: *, ?, [...]; repeatable)")
    p.set_defaults(func=cmd_backup, backup_parser=p)
    return p


def _add_restore(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``restore`` command."""
    p = sub.add_parser("restore", parents=[common],
                       help="restore disks to a file, a directory or their original devices, "
                            "or a shut-off domain live")
    p.add_argument("domain", help="domain UUID, or its name at backup time")
    _add_store(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--disk", action="append", metavar="DEV",
                       help="a disk to restore (e.g. vdb; repeatable with --to-dir, "
                            "--to-original and --live)")
    which.add_argument("--all-disks", action="store_true",
                       help="every disk of the backup (with --to-dir, --to-original or "
                            "--live)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="PATH",
                       help="new file, existing file, block device or RBD image "
                            "(rbd:POOL/IMAGE[?conf=PATH&id=USER]) to write the one disk to")
    where.add_argument("--to-dir", metavar="DIR",
                       help="write each disk to a new sparse file DIR/DISK.raw")
    where.add_argument("--to-original", action="store_true",
                       help="write each disk to its original device, found on this host by "
                            "the identity the backup recorded (see docs/restore.md)")
    where.add_argument("--live", action="store_true",
                       help="start the shut-off domain at once on its backup and copy each disk "
                            "back onto its own source meanwhile; the guest's writes are kept "
                            "and each disk switches onto its source when its copy is done "
                            "(default: every disk of the backup; see docs/live-restore.md)")
    p.add_argument("--backup", metavar="ID", help="backup id (default: the newest)")
    p.add_argument("--dry-run", action="store_true",
                   help="with --to-dir or --to-original: print what would be written where "
                        "(and, with --to-original, the identity matched on); write nothing")
    p.add_argument("--define", metavar="NAME",
                   help="after restoring every disk (--to-dir or --to-original), define a new "
                        "domain NAME from the backup's domain XML on the restored disks")
    p.add_argument("--start", action="store_true", help="with --define: start the new domain")
    p.add_argument("--force", action="store_true",
                   help="write even to a smaller --to target or to a device used by a running "
                        "domain (not with --live)")
    p.add_argument("--bwlimit", type=mib_per_s, metavar="MIB/S",
                   help="write at most this fast, in MiB/s (with --live: each disk's block "
                        "copy; default: no limit)")
    add_key_option(p, "the key of encrypted backups (not with --live)")
    p.set_defaults(func=cmd_restore)


def _add_verify(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``verify`` command."""
    p = _repository_command(sub, common, "verify", "recompute and check stored digests")
    p.add_argument("--backup", metavar="ID",
                   help="only this backup, with the layers it builds on")
    p.add_argument("--deep", action="store_true",
                   help="also read every point whole through QEMU and compare it with its "
                        "chunk map (encrypted points need --encrypt-key-file)")
    add_key_option(p, "the key of encrypted backups (for --deep)")
    p.set_defaults(func=cmd_verify)


def _add_hook(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``hook`` command."""
    p = sub.add_parser("hook", parents=[common],
                       help="install or remove the libvirt hook that records VM restarts")
    p.add_argument("action", choices=("install", "uninstall"), help="install or remove the hook")
    p.add_argument("--hooks-dir", default="/etc/libvirt/hooks", metavar="DIR",
                   help="libvirt's hook directory (default: %(default)s)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="where the hook records events (default: "
                        "/var/lib/libvirt-rdm-backup/events)")
    p.set_defaults(func=cmd_hook)


def _add_export(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``export`` command."""
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


def _add_receive(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``receive`` command."""
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


def _point_options(p: Parser) -> None:
    """The options that name a backup point: ``serve`` and ``mount``."""
    p.add_argument("domain", help="domain UUID, or its name at backup time")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory, NBD volume URI or rbd:// URI")
    p.add_argument("--disk", required=True, metavar="DEV", help="the disk (e.g. vdb)")
    p.add_argument("--backup", metavar="ID", help="backup id (default: the newest)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check the layers' digests first (a warning says so)")
    add_key_option(p, "the key of an encrypted point")


def _add_serve(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``serve`` command."""
    p = sub.add_parser("serve", parents=[common],
                       help="serve a backup point of a disk read-only over NBD, uncopied")
    _point_options(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="unix socket to serve on (mode 0600)")
    where.add_argument("--listen", metavar="HOST:PORT",
                       help="TCP address to serve on (port 0: any free port; loopback "
                            "unless --tls-creds)")
    p.add_argument("--tls-creds", metavar="DIR",
                   help="x509 directory: with --listen, serve over TLS (ca-cert.pem, "
                        "server-cert.pem, server-key.pem; clients: the subject of "
                        "client-cert.pem when there is one); for an nbds:// target, its "
                        "client credentials (client-cert.pem, client-key.pem)")
    p.add_argument("--timeout", type=seconds, metavar="SECONDS",
                   help="stop after this long (default: at SIGINT or SIGTERM)")
    p.set_defaults(func=cmd_serve)


def _add_mount(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``mount`` and ``umount`` commands."""
    p = sub.add_parser("mount", parents=[common],
                       help="mount the filesystems of a backup point read-only, uncopied")
    _point_options(p)
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)
    p.add_argument("mountpoint", metavar="MOUNTPOINT",
                   help="an empty directory; each filesystem is mounted below it")
    p.set_defaults(func=cmd_mount)
    p = sub.add_parser("umount", parents=[common],
                       help="undo a mount: unmount, detach, stop serving")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="the directory given to mount")
    p.set_defaults(func=cmd_umount)


def _add_agent(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``agent`` command."""
    p = sub.add_parser("agent", parents=[common],
                       help="answer one JSON request of a backup server (run by sshd with a "
                            "forced command; see docs/remote-backups.md)")
    p.set_defaults(func=cmd_agent)


def _add_list(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``list`` command."""
    p = _repository_command(sub, common, "list", "list backups in a repository")
    p.set_defaults(func=cmd_list)


def _repository_command(sub: argparse._SubParsersAction[Parser], common: Parser, name: str,
                        summary: str) -> Parser:
    """A command over a repository's backups, of one domain or of all of them."""
    p = sub.add_parser(name, parents=[common], help=summary)
    p.add_argument("domain", nargs="?",
                   help="only this domain's backups: its UUID, or its name at backup time")
    _add_store(p)
    return p


def _add_prune(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``prune`` command."""
    p = sub.add_parser("prune", parents=[common],
                       help="remove the points of chains that retention rules do not keep")
    p.add_argument("domain", nargs="?",
                   help="only this domain's chains: its UUID, or its name at backup time")
    p.add_argument("--all", action="store_true", help="every domain's chains")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory, NBD volume URI or rbd:// URI")
    p.add_argument("--chain", metavar="NAME", help="only this chain (default: every chain)")
    add_keep_options(p, "(in UTC; the rules apply in this order, see docs/retention.md)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be kept and dropped, and why; change nothing")
    add_key_option(p, "the key of an encrypted repository (its merges read and write "
                      "encrypted layers)")
    p.set_defaults(func=cmd_prune)


def _add_rekey(sub: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """The ``rekey`` command."""
    p = sub.add_parser("rekey", parents=[common],
                       help="change the key of every encrypted layer of a file repository "
                            "or NBD volume")
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory or NBD volume URI")
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)
    add_key_option(p, "the repository's or volume's key now")
    p.add_argument("--new-key-file", metavar="FILE",
                   help="the key the layers get instead (the file's exact bytes)")
    p.set_defaults(func=cmd_rekey)


def _add_schedule(sub: argparse._SubParsersAction[Parser], common: Parser,
                  backup: Parser) -> None:
    """The ``schedule`` command."""
    p = sub.add_parser("schedule", parents=[common],
                       help="install or remove a systemd timer that runs backup --all for a "
                            "target (see docs/scheduling.md)")
    p.add_argument("action", choices=("install", "uninstall"),
                   help="install (or update) or remove the timer rdm-backup@NAME.timer")
    p.add_argument("name", metavar="NAME",
                   help="the timer's instance name: letters, digits and _ . : -")
    p.add_argument("--target", metavar="DIR|URI", help="install: the repository of backup --all")
    p.add_argument("--on-calendar", metavar="SPEC",
                   help="install: when to run, as a systemd calendar expression (default: "
                        "nightly at 01:00 with up to 1 h random delay)")
    p.add_argument("--options", metavar="\"OPTIONS\"",
                   help="install: more options of backup --all (e.g. \"--jobs 2 --quiesce\"), "
                        "checked with its parser before they are written")
    p.add_argument("--unit-dir", default="/etc/systemd/system", metavar="DIR",
                   help="where the units go (default: %(default)s)")
    p.add_argument("--config-dir", default="/etc/libvirt-rdm-backup", metavar="DIR",
                   help="where the environment file NAME.env goes (default: %(default)s)")
    p.add_argument("--no-enable", action="store_true",
                   help="write the files but run no systemctl (it is never run where systemd "
                        "is not the init system: the commands are printed)")
    p.set_defaults(func=cmd_schedule, backup_parser=backup)


def add_key_option(p: Parser, what: str) -> None:
    """``--encrypt-key-file FILE`` (its exact bytes are the key; never shown)."""
    p.add_argument("--encrypt-key-file", metavar="FILE",
                   help=f"{what} (the file's exact bytes are the key; see docs/encryption.md)")


def _add_store(p: Parser) -> None:
    """``--target`` and its ``--tls-creds``: where the backups are."""
    p.add_argument("--target", required=True, metavar="DIR|URI",
                   help="repository directory, NBD volume URI or rbd:// URI")
    p.add_argument("--tls-creds", metavar="DIR", help=TLS_HELP)

