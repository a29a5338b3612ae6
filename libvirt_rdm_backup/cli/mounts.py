"""``mount`` and ``umount``: the filesystems of a backup point, read-only, without a copy."""

from __future__ import annotations

import argparse
import sys

from libvirt_rdm_backup.cli.output import EXIT_OK, emit, human_size


def cmd_mount(args: argparse.Namespace) -> int:
    """Mount each filesystem of a backup point read-only under MOUNTPOINT."""
    from libvirt_rdm_backup.engine.mount import mount
    from libvirt_rdm_backup.engine.serve import NO_VERIFY_WARNING, ServeRequest

    request = ServeRequest(domain=args.domain, target=args.target, disk=args.disk,
                           backup_id=args.backup, tls_dir=args.tls_creds,
                           verify=not args.no_verify, key_file=args.encrypt_key_file)
    listing = mount(request, args.mountpoint)
    if not listing.verified:
        sys.stderr.write(f"rdm-backup: warning: {NO_VERIFY_WARNING}\n")

    def text() -> str:
        table = listing.partition_table or "no partition table"
        lines = [f"mounted backup {listing.backup_id} of {listing.domain} disk {listing.disk} "
                 f"({human_size(listing.size)}, {table}) read-only at {listing.mountpoint}; "
                 f"undo with: rdm-backup umount {listing.mountpoint}"]
        for part in listing.partitions:
            where = f"mounted on {part.path}" if part.path else part.reason
            lines.append(f"  {part.name:6} {part.fstype or '-':12} {human_size(part.size):>10}"
                         f"  {where}")
        return "\n".join(lines) + "\n"

    emit(args, listing.to_dict(), text)
    return EXIT_OK


def cmd_umount(args: argparse.Namespace) -> int:
    """Undo a mount: every filesystem, loop device, the nbdfuse file, the serve, the state."""
    from libvirt_rdm_backup.engine.unmount import umount

    done = umount(args.mountpoint)

    def text() -> str:
        return (f"unmounted {done.mountpoint}: {len(done.unmounted)} filesystem(s), "
                f"{len(done.loop_devices)} loop device(s) detached, the point is no "
                "longer served\n")

    emit(args, done.to_dict(), text)
    return EXIT_OK
