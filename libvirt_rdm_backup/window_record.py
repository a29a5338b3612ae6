"""The record a consistency window leaves while it holds a guest, and its repair.

A window writes what it holds (``freeze``, ``pause``) into a small file per
domain before holding it, and removes the file once it let go. A run killed
inside the window leaves the file: the watchdog (:mod:`libvirt_rdm_backup.watchdog`)
or the next run reads it and thaws or resumes the guest (:func:`recover_window`).
"""

from __future__ import annotations

import json
import logging
import os

import libvirt

from libvirt_rdm_backup.process import env_seconds

log = logging.getLogger(__name__)

MARKER_DIR_ENV = "RDM_BACKUP_WINDOW_DIR"
DEFAULT_MARKER_DIR = "/run/libvirt-rdm-backup/windows"
AGENT_TIMEOUT_ENV = "RDM_BACKUP_AGENT_TIMEOUT"
DEFAULT_AGENT_TIMEOUT = 10.0


def marker_dir() -> str:
    """Directory of the window records (``RDM_BACKUP_WINDOW_DIR``)."""
    return os.environ.get(MARKER_DIR_ENV) or DEFAULT_MARKER_DIR


def agent_timeout() -> int:
    """Seconds libvirt waits for the guest agent (``RDM_BACKUP_AGENT_TIMEOUT``)."""
    return max(1, round(env_seconds(AGENT_TIMEOUT_ENV, DEFAULT_AGENT_TIMEOUT)))


def marker_path(domain_uuid: str, directory: str | None = None) -> str:
    """The window record of a domain."""
    return os.path.join(directory or marker_dir(), f"{domain_uuid}.json")


def window_open(domain_uuid: str, directory: str | None = None) -> bool:
    """True while the domain's window record exists (open, or left by a failed undo)."""
    return os.path.exists(marker_path(domain_uuid, directory))


def write_marker(domain_uuid: str, kinds: list[str]) -> None:
    """Record what the window holds (``maybe-frozen`` is recorded as ``freeze``)."""
    os.makedirs(marker_dir(), mode=0o700, exist_ok=True)
    named = sorted({"freeze" if kind == "maybe-frozen" else kind for kind in kinds})
    path = marker_path(domain_uuid)
    with open(f"{path}.{os.getpid()}", "w", encoding="utf-8") as stream:
        json.dump({"kinds": named, "pid": os.getpid()}, stream)
    os.replace(f"{path}.{os.getpid()}", path)  # whole or absent, for a reader after a kill


def drop_marker(domain_uuid: str, directory: str | None = None) -> None:
    """Remove the domain's window record (the window let go)."""
    try:
        os.unlink(marker_path(domain_uuid, directory))
    except FileNotFoundError:
        pass


def set_agent_timeout(dom: libvirt.virDomain) -> None:
    """Bound every later guest agent call of the domain (libvirt's default waits forever)."""
    try:
        dom.agentSetResponseTimeout(agent_timeout(), 0)
    except (libvirt.libvirtError, AttributeError):
        pass


def _paused_by_suspend(dom: libvirt.virDomain) -> bool:
    """True when the vCPUs are paused by a suspend (not by an I/O error, a migration...)."""
    state, reason = dom.state()
    return bool(state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_USER)


def recover_window(dom: libvirt.virDomain, directory: str | None = None) -> list[str]:
    """Thaw or resume a guest that a killed run left frozen or paused; returns what was done.

    Call it only while holding the domain's lock (so no live run owns the window).
    The record only names what the run itself did: a guest paused before it stays
    paused. The record stays when a thaw fails (the next attempt retries).
    """
    uuid = dom.UUIDString()
    path = marker_path(uuid, directory)
    try:
        with open(path, encoding="utf-8") as stream:
            kinds = list(json.load(stream).get("kinds", []))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError):
        kinds = ["freeze", "pause"]
    done = []
    failed = False
    try:
        if "pause" in kinds and _paused_by_suspend(dom):  # first: the agent needs vCPUs
            dom.resume()
            done.append("resumed the guest")
    except libvirt.libvirtError as err:
        log.warning("could not resume the guest left paused by a killed run: %s", err)
        failed = True
    if "freeze" in kinds and not failed:
        try:
            set_agent_timeout(dom)
            dom.fsThaw(None, 0)
            done.append("thawed the guest's filesystems")
        except libvirt.libvirtError as err:
            log.warning("could not thaw the guest left frozen by a killed run: %s",
                        err.get_error_message())
            failed = True
    if not failed:
        drop_marker(uuid, directory)
    for item in done:
        log.warning("a killed backup had left the window open: %s", item)
    return done
