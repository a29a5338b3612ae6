"""libvirt connection and domain lookup; libvirt errors become the project's errors."""

from __future__ import annotations

import os
import re
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import libvirt

from libvirt_rdm_backup.errors import LibvirtError, NotFoundError, UsageError
from libvirt_rdm_backup.redact import redact

DEFAULT_URI = "qemu:///system"
_NAME_RE = re.compile(r"^[^\x00-\x1f/]{1,255}$")


def _silence_libvirt(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; errors are raised instead."""


libvirt.registerErrorHandler(_silence_libvirt, None)


def default_uri() -> str:
    """``LIBVIRT_DEFAULT_URI`` or ``qemu:///system``."""
    return os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


def open_connection(uri: str | None = None, read_only: bool = False) -> libvirt.virConnect:
    """Open a read-write (or read-only) libvirt connection (raises LibvirtError)."""
    target = uri or default_uri()
    try:
        return libvirt.openReadOnly(target) if read_only else libvirt.open(target)
    except libvirt.libvirtError as err:
        raise LibvirtError(
            f"cannot connect to {redact(target)}: {redact(str(err.get_error_message()))}"
        ) from err


def connection_uri(conn: libvirt.virConnect) -> str:
    """The URI of an open connection, password removed (raises LibvirtError)."""
    try:
        return redact(str(conn.getURI()))
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot read the connection URI: {err}") from err


def is_remote(conn: libvirt.virConnect) -> bool:
    """True when libvirt is reached over the network: its QEMU gets no local file descriptors."""
    parts = urlsplit(connection_uri(conn))
    return bool(parts.netloc) or parts.scheme.partition("+")[2] not in ("", "unix")


@contextmanager
def connection(uri: str | None = None, read_only: bool = False
               ) -> Iterator[libvirt.virConnect]:
    """A libvirt connection closed on exit."""
    conn = open_connection(uri, read_only)
    try:
        yield conn
    finally:
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def lookup_domain(conn: libvirt.virConnect, name_or_uuid: str) -> libvirt.virDomain:
    """Find a domain by UUID or by name.

    Raises UsageError for a malformed name, NotFoundError when no domain matches.
    """
    if not name_or_uuid or not _NAME_RE.match(name_or_uuid):
        raise UsageError(f"malformed domain name or UUID: {name_or_uuid!r}")
    try:
        parsed = uuidlib.UUID(name_or_uuid)
    except ValueError:
        parsed = None
    try:
        if parsed is not None:
            try:
                return conn.lookupByUUIDString(str(parsed))
            except libvirt.libvirtError as err:
                if err.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise
        return conn.lookupByName(name_or_uuid)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFoundError(f"domain {name_or_uuid!r} not found") from err
        raise LibvirtError(f"cannot look up domain {name_or_uuid!r}: {err}") from err


def is_running(dom: libvirt.virDomain) -> bool:
    """True while the domain has a QEMU process (running or paused)."""
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot query domain state: {err}") from err


def is_paused(dom: libvirt.virDomain) -> bool:
    """True when the domain's vCPUs are paused."""
    try:
        state, _reason = dom.state()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot query domain state: {err}") from err
    return bool(state == libvirt.VIR_DOMAIN_PAUSED)


def domain_xml(dom: libvirt.virDomain, inactive: bool = False) -> str:
    """The domain's live XML (or its persistent definition)."""
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
    try:
        return str(dom.XMLDesc(flags))
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot read domain XML: {err}") from err


def active_domains(conn: libvirt.virConnect) -> list[libvirt.virDomain]:
    """Every running domain on the connection."""
    try:
        return list(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE))
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot list domains: {err}") from err


def define_domain(conn: libvirt.virConnect, xml: str, start: bool) -> libvirt.virDomain:
    """Define a new domain from ``xml`` (and start it); LibvirtError when libvirt refuses.

    A domain that was defined but does not start is left defined (the error says so).
    """
    try:
        dom = conn.defineXML(xml)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"libvirt refused the new domain: {err}") from err
    if start:
        try:
            dom.create()
        except libvirt.libvirtError as err:
            raise LibvirtError(f"domain {dom.name()} was defined but did not start: "
                               f"{err}") from err
    return dom


def domain_name_taken(conn: libvirt.virConnect, name: str) -> bool:
    """True when a domain of this name is defined on the connection."""
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    return True


def secret_value(conn: libvirt.virConnect, uuid: str | None, usage: str | None) -> bytes:
    """The value of the libvirt ``ceph`` secret with this UUID (else this usage name).

    Raises LibvirtError (never quoting the value) when there is no such secret or
    libvirt does not reveal it (a private secret, a read-only connection).
    """
    what = f"secret {uuid}" if uuid else f"ceph secret {usage!r}"
    try:
        if uuid:
            secret = conn.secretLookupByUUIDString(uuid)
        elif usage:
            secret = conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_CEPH, usage)
        else:
            raise LibvirtError("no libvirt secret named")
        return bytes(secret.value())
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot read libvirt {what}: {err.get_error_message()}") from err
