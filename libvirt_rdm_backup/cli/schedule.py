"""``schedule``: install or remove a systemd timer that runs ``backup --all`` for a target."""

from __future__ import annotations

import argparse
import shlex

from libvirt_rdm_backup.cli.fleet import check_usage
from libvirt_rdm_backup.cli.output import EXIT_OK, emit
from libvirt_rdm_backup.cli.prune import backup_retention
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.schedule.install import install, uninstall
from libvirt_rdm_backup.schedule.texts import check_calendar, check_instance
from libvirt_rdm_backup.targets.uri import parse_target

_PROBE_TARGET = "/nonexistent/rdm-backup-schedule-probe"


def checked_options(backup_parser: argparse.ArgumentParser, target: str, text: str
                    ) -> list[str]:
    """The words of ``--options``, parsed as ``backup --all --target TARGET OPTIONS`` would
    be (raises UsageError: bad options are refused before anything is written)."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise UsageError(f"schedule: --options: {err}") from err
    try:
        parsed = backup_parser.parse_args(["--all", "--target", _PROBE_TARGET, *words])
        check_usage(parsed)
        backup_retention(parsed)
    except UsageError as err:
        raise UsageError(f"schedule: --options: {str(err).removeprefix('backup: ')}") from err
    if parsed.target != _PROBE_TARGET:
        raise UsageError("schedule: --options: give the target with --target, not in --options")
    parse_target(target, allow_remote_plain=True)
    return words


def cmd_schedule(args: argparse.Namespace) -> int:
    """Install or remove the timer ``rdm-backup@NAME.timer``."""
    check_instance(args.name)
    if args.action == "install":
        if args.target is None:
            raise UsageError("schedule: install needs --target")
        options = checked_options(args.backup_parser, args.target, args.options or "")
        calendar = None if args.on_calendar is None else check_calendar(args.on_calendar)
        change = install(args.name, args.target, options, calendar, args.unit_dir,
                         args.config_dir, enable=not args.no_enable)
    else:
        for option, value in (("--target", args.target), ("--options", args.options),
                              ("--on-calendar", args.on_calendar)):
            if value is not None:
                raise UsageError(f"schedule: {option} applies to install only")
        change = uninstall(args.name, args.unit_dir, args.config_dir,
                           enable=not args.no_enable)

    def text() -> str:
        lines = [f"{change.action}ed {change.timer}"]
        lines += [f"  {path}" for path in change.files]
        if change.enabled:
            lines.append("  systemctl: done")
        elif change.commands:
            lines.append("  systemd is not running here (or --no-enable); run:")
            lines += [f"    {' '.join(c)}" for c in change.commands]
        return "\n".join(lines) + "\n"

    emit(args, change.to_dict(), text)
    return EXIT_OK
