"""A small ctypes binding to the system libiscsi: raw VPD pages straight from an iSCSI LUN.

``iscsi-inq`` prints binary designators as C strings, so it cannot report an NAA
value that holds a zero byte. This module logs in to the LUN with libiscsi itself
(``libiscsi.so.7``, Debian package ``libiscsi7``; the -dev package is not needed)
and returns the page bytes exactly as the LUN sent them.

Only the functions' C signatures are relied upon, not the layout of libiscsi's
``struct scsi_task``: the INQUIRY task gets a data-in buffer of ours
(``scsi_task_add_data_in_buffer``), and its status is read with
``scsi_task_get_status``. The one structure read is ``struct iscsi_url``
(portal and LUN), whose layout in ``iscsi/iscsi.h`` is six ``char[256]`` arrays
followed by ``int lun``.

The URL goes through ``iscsi_parse_full_url``, which also hands the target name
and any ``user%password@`` credentials to the context, like the libiscsi tools do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import threading
from typing import Any

from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.redact import redact

INITIATOR_NAME = "iqn.2026-11.org.libvirt-rdm-backup:inquirer"
LIBRARY_NAMES = ("libiscsi.so.7",)
DEFAULT_TIMEOUT = 60.0

ISCSI_SESSION_NORMAL = 2
ISCSI_HEADER_DIGEST_NONE_CRC32C = 1
SCSI_STATUS_GOOD = 0
_MAX_STRING_SIZE = 255
_SHORT_ALLOCATION = 255  # what SPC-2 era devices accept
_MAX_ALLOCATION = 0xFFFF  # INQUIRY's ALLOCATION LENGTH is 16 bits
class _IscsiUrl(ctypes.Structure):
    """``struct iscsi_url`` from ``iscsi/iscsi.h`` (only portal and lun are read)."""

    _fields_ = [
        ("portal", ctypes.c_char * (_MAX_STRING_SIZE + 1)),
        ("target", ctypes.c_char * (_MAX_STRING_SIZE + 1)),
        ("user", ctypes.c_char * (_MAX_STRING_SIZE + 1)),
        ("passwd", ctypes.c_char * (_MAX_STRING_SIZE + 1)),
        ("target_user", ctypes.c_char * (_MAX_STRING_SIZE + 1)),
        ("target_passwd", ctypes.c_char * (_MAX_STRING_SIZE + 1)),
        ("lun", ctypes.c_int),
        ("iscsi", ctypes.c_void_p),
        ("transport", ctypes.c_int),
    ]


_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "iscsi_create_context": (ctypes.c_void_p, [ctypes.c_char_p]),
    "iscsi_destroy_context": (ctypes.c_int, [ctypes.c_void_p]),
    "iscsi_get_error": (ctypes.c_char_p, [ctypes.c_void_p]),
    "iscsi_parse_full_url": (ctypes.POINTER(_IscsiUrl), [ctypes.c_void_p, ctypes.c_char_p]),
    "iscsi_destroy_url": (None, [ctypes.POINTER(_IscsiUrl)]),
    "iscsi_set_session_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "iscsi_set_header_digest": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "iscsi_set_timeout": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int]),
    "iscsi_set_noautoreconnect": (None, [ctypes.c_void_p, ctypes.c_int]),
    "iscsi_full_connect_sync": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]),
    "iscsi_is_logged_in": (ctypes.c_int, [ctypes.c_void_p]),
    "iscsi_logout_sync": (ctypes.c_int, [ctypes.c_void_p]),
    "scsi_cdb_inquiry": (ctypes.c_void_p, [ctypes.c_int, ctypes.c_int, ctypes.c_int]),
    "scsi_task_add_data_in_buffer": (
        ctypes.c_int,
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p],
    ),
    "iscsi_scsi_command_sync": (
        ctypes.c_void_p,
        [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p],
    ),
    "scsi_task_get_status": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p]),
    "scsi_free_scsi_task": (None, [ctypes.c_void_p]),
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


class Libiscsi:
    """The functions of a loaded libiscsi, with their C signatures declared."""

    def __init__(self, library: ctypes.CDLL, initiator_name: str = INITIATOR_NAME) -> None:
        self.initiator_name = initiator_name
        self.path = getattr(library, "_name", "libiscsi")
        self._functions: dict[str, Any] = {}
        for name, (restype, argtypes) in _SIGNATURES.items():
            try:
                function = getattr(library, name)
            except AttributeError as err:
                raise StorageError(f"{self.path} lacks {name}") from err
            function.restype = restype
            function.argtypes = argtypes
            self._functions[name] = function

    def _call(self, name: str, *args: Any) -> Any:
        return self._functions[name](*args)

    def _error(self, context: int) -> str:
        message = self._call("iscsi_get_error", context)
        text = message.decode("utf-8", "replace") if message else ""
        return _one_line(text) or "no error text from libiscsi"

    def inquiry_vpd(self, url: str, page: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """VPD ``page`` of the LUN at ``url`` as the LUN sent it (header included).

        Logs in, sends INQUIRY with EVPD=1 (allocation length 255, again with the
        page's full length if it is longer), logs out. Any failure is a
        :class:`StorageError` with one line naming the URL (without password).
        """
        shown = redact(url)
        context = self._call("iscsi_create_context", self.initiator_name.encode())
        if not context:
            raise StorageError(f"libiscsi: cannot create an iSCSI context for {shown}")
        tasks: list[int] = []
        buffers: list[ctypes.Array[ctypes.c_char]] = []
        try:
            portal, lun = self._parse_url(context, url, shown)
            self._call("iscsi_set_session_type", context, ISCSI_SESSION_NORMAL)
            self._call("iscsi_set_header_digest", context, ISCSI_HEADER_DIGEST_NONE_CRC32C)
            self._call("iscsi_set_noautoreconnect", context, 1)
            self._call("iscsi_set_timeout", context, max(1, math.ceil(timeout)))
            if self._call("iscsi_full_connect_sync", context, portal, lun) != 0:
                raise StorageError(f"libiscsi: cannot log in to {shown}: {self._error(context)}")
            try:
                data = self._inquiry(context, lun, page, _SHORT_ALLOCATION, tasks, buffers)
                needed = 4 + int.from_bytes(data[2:4], "big")
                if needed > len(data):
                    allocation = min(needed, _MAX_ALLOCATION)
                    data = self._inquiry(context, lun, page, allocation, tasks, buffers)
            finally:
                if self._call("iscsi_is_logged_in", context):
                    self._call("iscsi_logout_sync", context)
        finally:
            # Destroying the context cancels anything still in flight; only then
            # are the tasks (and the buffers they point into) safe to release.
            self._call("iscsi_destroy_context", context)
            for task in tasks:
                self._call("scsi_free_scsi_task", task)
            buffers.clear()
        if len(data) < 4 or data[1] != page:
            raise StorageError(
                f"libiscsi: {shown} answered INQUIRY VPD 0x{page:02x} "
                f"with page 0x{data[1] if len(data) > 1 else 0:02x}"
            )
        return data

    def _parse_url(self, context: int, url: str, shown: str) -> tuple[bytes, int]:
        parsed = self._call("iscsi_parse_full_url", context, url.encode())
        if not parsed:
            raise StorageError(f"libiscsi: invalid iSCSI URL {shown}: {self._error(context)}")
        try:
            return bytes(parsed.contents.portal), int(parsed.contents.lun)
        finally:
            self._call("iscsi_destroy_url", parsed)

    def _inquiry(
        self,
        context: int,
        lun: int,
        page: int,
        allocation: int,
        tasks: list[int],
        buffers: list[ctypes.Array[ctypes.c_char]],
    ) -> bytes:
        task = self._call("scsi_cdb_inquiry", 1, page, allocation)
        if not task:
            raise StorageError("libiscsi: cannot create an INQUIRY task")
        tasks.append(task)
        buffer = ctypes.create_string_buffer(allocation)
        buffers.append(buffer)
        if self._call("scsi_task_add_data_in_buffer", task, allocation, buffer) != 0:
            raise StorageError("libiscsi: cannot attach the INQUIRY data-in buffer")
        done = self._call("iscsi_scsi_command_sync", context, lun, task, None)
        status = self._call("scsi_task_get_status", task, None)
        if not done or status != SCSI_STATUS_GOOD:
            raise StorageError(f"libiscsi: INQUIRY VPD 0x{page:02x} failed: {self._error(context)}")
        data = buffer.raw
        length = min(allocation, 4 + int.from_bytes(data[2:4], "big"))
        return data[:length]


_loaded: list[Libiscsi | None] = []
_load_lock = threading.Lock()


def library_path() -> str | None:
    """The libiscsi shared object to load: ``find_library("iscsi")`` or ``libiscsi.so.7``."""
    return ctypes.util.find_library("iscsi") or LIBRARY_NAMES[0]


def load() -> Libiscsi | None:
    """The system libiscsi, or None when it cannot be loaded (checked once per process)."""
    with _load_lock:
        if not _loaded:
            _loaded.append(_try_load())
        return _loaded[0]


def _try_load() -> Libiscsi | None:
    path = library_path()
    if path is None:
        return None
    try:
        return Libiscsi(ctypes.CDLL(path))
    except (OSError, StorageError):
        return None


def inquiry_vpd(url: str, page: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """VPD ``page`` of the LUN at ``url`` via the system libiscsi (StorageError if absent)."""
    library = load()
    if library is None:
        raise StorageError("libiscsi (libiscsi.so.7, package libiscsi7) cannot be loaded")
    return library.inquiry_vpd(url, page, timeout)
