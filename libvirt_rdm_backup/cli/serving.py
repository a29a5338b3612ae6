"""``export``, ``receive`` and ``serve``: the commands that serve disks, a backup volume or a
backup point over NBD."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from libvirt_rdm_backup import api, retry
from libvirt_rdm_backup.cli.output import EXIT_OK
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.repository.chain import DEFAULT_CHAIN


def cmd_export(args: argparse.Namespace) -> int:
    """Serve a point in time of raw disks over NBD until SIGINT, SIGTERM or --timeout."""
    if args.chain is not None and args.target is None:
        raise UsageError("export: --chain needs --target")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("export: --timeout must be a positive number of seconds")
    # from here on a signal only ends the wait: the teardown always runs to its end
    with signals_noted() as stop, \
            api.export(args.domain, args.disk, socket=args.socket, listen=args.listen,
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
            # a failed fleecing job ends it: the point in time is gone
            reason = until_stopped(stop, args.timeout, handle.check)
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


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a backup point read-only over NBD until SIGINT, SIGTERM or --timeout."""
    from libvirt_rdm_backup.engine.serve import ServeRequest, serve_point

    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("serve: --timeout must be a positive number of seconds")
    request = ServeRequest(domain=args.domain, target=args.target, disk=args.disk,
                           backup_id=args.backup, socket=args.socket, listen=args.listen,
                           tls_dir=args.tls_creds, verify=not args.no_verify,
                           key_file=args.encrypt_key_file)
    # from here on a signal only ends the wait: the teardown always runs to its end
    with signals_noted() as stop:
        with serve_point(request) as served:
            if args.json:
                sys.stdout.write(json.dumps(served.to_dict()) + "\n")
            else:
                until = f" (or {args.timeout:g} s)" if args.timeout else ""
                sys.stdout.write(f"{served.uri}\nserving backup {served.backup_id} disk "
                                 f"{served.disk} ({served.size} bytes) read-only, until "
                                 f"SIGINT or SIGTERM{until}\n")
            sys.stdout.flush()
            # the daemon stopping on its own ends it
            reason = until_stopped(stop, args.timeout, served.check)
    if not args.json:
        sys.stdout.write(f"stopped ({reason}): the point is no longer served\n")
    return EXIT_OK


def until_stopped(stop: list[str], timeout: float | None, check: Callable[[], None]) -> str:
    """Wait until a signal name lands in ``stop`` or ``timeout`` s pass, calling ``check``
    (which raises when what is served failed) every second; the reason it ended."""
    next_check = time.monotonic() + 1.0

    def stopped() -> bool:
        nonlocal next_check
        if not stop and time.monotonic() >= next_check:
            check()
            next_check = time.monotonic() + 1.0
        return bool(stop)

    retry.serve_until_stopped(timeout)(stopped)
    return stop[0] if stop else f"timeout after {timeout:g} s"


@contextmanager
def signals_noted() -> Iterator[list[str]]:
    """SIGINT and SIGTERM only noted (their names, in the list yielded) while in the block;
    the handlers before it are back after it."""
    stop: list[str] = []

    def note(signum: int, _frame: object) -> None:
        stop.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, note) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

