"""``backup --all``: every domain of the connection with raw disks, into one repository."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from libvirt_rdm_backup.cli.output import EXIT_OK, emit, human_size, one_line
from libvirt_rdm_backup.domain.connection import connection
from libvirt_rdm_backup.engine.backup import BackupOptions
from libvirt_rdm_backup.errors import OperationError, UsageError
from libvirt_rdm_backup.fleet.runner import DomainResult, Runner, backup_argv
from libvirt_rdm_backup.fleet.selection import candidates, check_patterns
from libvirt_rdm_backup.fleet.severity import most_severe
from libvirt_rdm_backup.fleet.status import Entry, StatusFile
from libvirt_rdm_backup.fleet.target import create_repository, writers
from libvirt_rdm_backup.redact import printable, redact
from libvirt_rdm_backup.remote import SshAgent
from libvirt_rdm_backup.repository.ids import now_iso

MAX_JOBS = 64
# options of ``backup`` that a run of many does not pass on to each domain's backup
NOT_FORWARDED = {"help", "json", "connect", "verbose", "domain", "target", "all", "jobs",
                 "exclude", "disk"}


def jobs(text: str) -> int:
    """How many backups run at once (argparse type: 1 to 64)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_JOBS:
        raise argparse.ArgumentTypeError(f"not a number from 1 to {MAX_JOBS}: {text!r}")
    return value


def check_usage(args: argparse.Namespace) -> None:
    """A DOMAIN or ``--all``, and the options of each only with it (raises UsageError)."""
    every = getattr(args, "all", False)
    if every and args.domain is not None:
        raise UsageError("backup: give a DOMAIN or --all, not both")
    if not every:
        if args.domain is None:
            raise UsageError("backup: a DOMAIN or --all is required")
        for option, value in (("--jobs", args.jobs), ("--exclude", args.exclude)):
            if value is not None:
                raise UsageError(f"backup: {option} applies to --all only")
        return
    if args.disk:
        raise UsageError("backup: --disk names disks of one domain; not with --all")
    check_patterns(args.exclude or [])
    # what each domain's backup would refuse is refused once, here
    BackupOptions(level=args.level, chain=args.chain, quiesce=args.quiesce,
                  allow_plain_nbd=args.allow_plain_nbd, tls_dir=args.tls_creds,
                  max_pause=args.max_pause, bwlimit=args.bwlimit, compress=args.compress,
                  encrypt_key_file=args.encrypt_key_file)
    if args.agent:
        SshAgent(args.agent, identity=args.agent_identity, known_hosts=args.agent_known_hosts)


def forwarded_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The options given to ``backup --all`` that each domain's backup takes, as arguments."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_FORWARDED:
            continue
        value = getattr(args, action.dest, action.default)
        if value is None or value is False or value == action.default:
            continue
        option = max(action.option_strings, key=len)
        if action.nargs == 0:
            argv.append(option)
        elif isinstance(value, list):
            argv += [f"{option}={item}" for item in value]
        elif action.nargs == "?" and value == action.const:
            argv.append(option)
        else:
            argv.append(f"{option}={value}")
    return argv


def _text_line(result: DomainResult) -> str:
    name = printable(result.domain)
    if result.skipped is not None:
        return f"{name}  skipped: {result.skipped}\n"
    if result.exit_code != 0:
        return f"{name}  FAILED (exit {result.exit_code}): {result.error}\n"
    return (f"{name}  ok  {result.id}  {result.level}  {human_size(result.bytes)}  "
            f"{result.seconds:.1f} s\n")


def cmd_backup_all(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Back up every domain with raw disks; one line (or JSON entry) per domain."""
    patterns = check_patterns(args.exclude or [])
    status = StatusFile(args.target)
    count = writers(args.target, args.jobs or 1)
    with connection(args.connect, read_only=True) as conn:
        found = candidates(conn, patterns)
    if any(c.skipped is None for c in found):
        create_repository(args.target)
    options = forwarded_options(parser, args) + ["-v"] * args.verbose
    env = dict(os.environ)
    if args.connect:
        env["LIBVIRT_DEFAULT_URI"] = args.connect

    def done(result: DomainResult) -> None:
        if result.started:
            status.record(Entry(result.domain, result.uuid, now_iso(), result.id, result.level,
                                result.exit_code, result.error, result.skipped))
        if result.exit_code != 0:
            sys.stderr.write(f"rdm-backup: backup of {printable(result.domain)} failed "
                             f"(exit {result.exit_code}): {one_line(result.error or '')}\n")
        if not args.json:
            sys.stdout.write(_text_line(result))
            sys.stdout.flush()

    runner = Runner(lambda c: backup_argv(c.uuid, args.target, options), count, done, env,
                    verbose=args.verbose > 0)
    results = runner.run(found)
    status.finish()
    code = most_severe([r.exit_code for r in results])
    if runner.interrupted:
        code = most_severe([code, OperationError.exit_code])
    document: dict[str, Any] = {
        "target": redact(args.target), "jobs": count, "exit_code": code,
        "interrupted": runner.interrupted, "domains": [r.to_dict() for r in results]}
    if args.json:
        emit(args, document, lambda: "")
    elif not results:
        sys.stdout.write("no domains to back up\n")
    if runner.interrupted:
        sys.stderr.write("rdm-backup: error: interrupted, the run did not complete\n")
    return code if code else EXIT_OK
