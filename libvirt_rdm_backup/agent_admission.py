"""What a request to the hypervisor's agent may name: a block device, a domain's iSCSI LUN.

The backup server is not trusted with the hypervisor. Before the agent looks up
anything for a disk of a ``map`` request (:func:`admit`):

* ``source_path`` must be a block device node. Its mode comes from ``fstat`` of
  an ``O_PATH | O_NOFOLLOW`` descriptor (:func:`~.storage.devnodes.device_node`),
  which opens no device and reads nothing; a symbolic link is followed only where
  it lies in ``/dev`` (udev's ``/dev/disk/by-id/...``, ``/dev/mapper/...``) and
  not in a directory anyone may write to. A regular file, a directory, a FIFO, a
  socket, a character device or a link elsewhere is refused. A path that does
  not exist is left to the mapping, which then fails (there is nothing to read).
  ``H:B:T:L`` SCSI addresses are only looked up in sysfs.
* an iSCSI source must be one a domain on this host uses: host, port, IQN and
  LUN as a domain's XML, read through libvirt here, says
  (:func:`domain_iscsi_sources`). A portal the server chose is never contacted.

Each refusal is a :class:`~.errors.UsageError` (exit 2) in one line.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Collection

import libvirt

from libvirt_rdm_backup.domain.connection import connection, domain_xml
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.errors import LibvirtError, RdmBackupError, UsageError
from libvirt_rdm_backup.storage.devnodes import device_node

log = logging.getLogger(__name__)

DEV_ROOT = "/dev"
MAX_LINKS = 40

# the iSCSI sources the domains of this host use
IscsiSources = Callable[[], Collection[IscsiSource]]

_KINDS = ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a device node")


def _link_allowed(parent: str, dev_root: str) -> bool:
    """A link udev could have made: in ``dev_root``, in a directory only root writes."""
    if not (parent + "/").startswith(dev_root.rstrip("/") + "/"):
        return False
    try:
        return not os.stat(parent).st_mode & stat.S_IWOTH
    except OSError:
        return False


def check_block_source(path: str, dev_root: str = DEV_ROOT) -> None:
    """Refuse (UsageError) a ``source_path`` that is not a block device node.

    Nothing is opened but ``O_PATH`` descriptors; a missing path passes (see the
    module's description).
    """
    if not path.startswith("/") or "\0" in path:
        raise UsageError("source_path is not an absolute path")
    current = path
    for _ in range(MAX_LINKS):
        parent = os.path.realpath(os.path.dirname(current))
        current = os.path.join(parent, os.path.basename(current))
        try:
            st = device_node(current)
        except FileNotFoundError:
            return
        except OSError as err:
            raise UsageError(f"source_path {path} cannot be looked at: {err.strerror}; "
                             "refused") from err
        if stat.S_ISBLK(st.st_mode):
            return
        if not stat.S_ISLNK(st.st_mode):
            raise UsageError(f"source_path {path} is {_kind(st.st_mode)}, not a block device; "
                             "refused")
        if not _link_allowed(parent, dev_root):
            raise UsageError(f"source_path {path} is a symbolic link outside {dev_root}; "
                             "refused")
        try:
            current = os.path.normpath(os.path.join(parent, os.readlink(current)))
        except OSError as err:
            raise UsageError(f"source_path {path} cannot be looked at: {err.strerror}; "
                             "refused") from err
    raise UsageError(f"source_path {path}: too many levels of symbolic links; refused")


def domain_iscsi_sources(uri: str | None = None) -> set[IscsiSource]:
    """The iSCSI sources of the raw disks of every domain libvirt knows here.

    Running domains by their live XML, the others by their definition. Raises
    LibvirtError when libvirt cannot be asked.
    """
    found: set[IscsiSource] = set()
    with connection(uri, read_only=True) as conn:
        try:
            domains = conn.listAllDomains(0)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"cannot list domains: {err}") from err
        for dom in domains:
            try:
                inventory = inventory_from_xml(DomainXML.parse(domain_xml(dom)), False)
            except RdmBackupError as err:  # gone meanwhile, or XML the tool cannot read
                log.debug("iSCSI sources: skipping a domain: %s", err)
                continue
            found |= {disk.iscsi for disk in inventory.raw if disk.iscsi is not None}
    return found


def check_iscsi_source(source: IscsiSource, sources: IscsiSources) -> None:
    """Refuse (UsageError) an iSCSI source that no domain of this host uses."""
    if source not in sources():
        raise UsageError(f"iSCSI LUN {source.url} is not a disk of any domain on this host; "
                         "refused")


def admit(disk: RawDisk, sources: IscsiSources = domain_iscsi_sources,
          dev_root: str = DEV_ROOT) -> None:
    """Refuse (UsageError) a disk whose source is neither a block device nor a domain's LUN."""
    if disk.source_path is not None and disk.source_path.startswith("/"):
        check_block_source(disk.source_path, dev_root)
    if disk.iscsi is not None:
        check_iscsi_source(disk.iscsi, sources)
