"""``hook`` and ``agent``: the hypervisor side (the libvirt hook, the remote agent)."""

from __future__ import annotations

import argparse
from typing import Any

from libvirt_rdm_backup.cli.output import EXIT_OK, emit


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
    emit(args, document, lambda: message + "\n")
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    """The hypervisor side of remote backups: one JSON request on stdin, one answer line."""
    from libvirt_rdm_backup import agent

    return agent.main()
