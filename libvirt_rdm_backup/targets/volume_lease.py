"""The writer lease of an NBD volume, as the volume takes, renews and releases it.

One writer at a time, whatever address it reaches the export by: a writer first
takes the volume's lease (:mod:`lease`) by writing the next generation, with
its lease, into the older slot; it flushes, waits ``SETTLE`` seconds and reads
both slots back. A writer that read the table before another's claim landed
writes its own within ``CLAIM_WINDOW`` seconds of that read, so one of the two
claims is always the one both read back, and the other fails. The holder
renews the lease while it writes, and publishes only when the newest
generation is still its own (read again right before the new superblock is
written), releasing the lease with the publication. Each region it takes is
in its lease before anything is written there: the end of what it took past
the allocation pointer (``reserved``) and the free regions it took (``taken``).
The free list is checked when the lease is taken, before anything allocates
from it (:func:`~.volume_space.space_problem`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from typing import Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, VerificationError
from libvirt_rdm_backup.process import stall_timeout
from libvirt_rdm_backup.targets.lease import HELD, Lease
from libvirt_rdm_backup.targets.uri import NbdAddress
from libvirt_rdm_backup.targets.volume_format import SLOT, Region, Superblock, read_table
from libvirt_rdm_backup.targets.volume_space import space_problem, subtract

log = logging.getLogger("libvirt_rdm_backup.targets.nbd_volume")

SETTLE = 1.0  # seconds between writing a lease claim and reading it back
CLAIM_WINDOW = 0.5  # a claim is written at most this long after the table it builds on was read
CLAIM_ATTEMPTS = 4  # reads of the table of contents to take the writer lease on


class WriterLease:
    """The table of contents and writer lease of a volume (a base of :class:`NbdVolume`)."""

    address: NbdAddress
    handle: Any
    superblock: Superblock
    size: int
    next_free: int
    settle: float
    _free: list[Region]  # the free list as this writer allocates from it
    _taken: list[Region]  # free regions taken (also a lost holder's), recorded in the lease
    _allocated: list[Region]  # regions this writer allocated since it took the lease
    _lease: Lease | None  # held by this writer
    _mutex: threading.RLock  # the table of contents: writer and heartbeat
    _beat: threading.Event | None

    def write(self, offset: int, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def _write_superblock(self, superblock: Superblock) -> None:
        slot = 0 if superblock.generation % 2 == 0 else SLOT
        self.write(slot, superblock.to_bytes())
        self.flush()

    def _read_table(self) -> Superblock:
        newest = read_table(self.handle, self.address.uri)
        if newest is None:
            raise VerificationError(f"NBD volume {self.address.uri}: table of contents is gone")
        return newest

    def take_lease(self) -> None:
        """Become the volume's one writer, or fail (OperationError, exit 4) naming the holder.

        On success the table of contents is the one read back with the lease, and
        a heartbeat renews the lease until :meth:`publish` or :meth:`release_lease`.
        """
        with self._mutex:
            retry.lease_claim(self.address.uri, CLAIM_ATTEMPTS)(self._claim_lease, set())

    def _claim_lease(self, watched: set[tuple[int, str]]) -> None:
        """One attempt of :meth:`take_lease` (``watched``: expired leases already watched).

        Raises :class:`~.retry.Again` to look again: after half the ``ttl`` of an expired
        lease first seen (longer than its renewal interval), or at once after a read that
        was too slow to build a claim on.
        """
        uri = self.address.uri
        began = time.monotonic()
        current = self._read_table()
        held = current.lease
        if held is not None and not held.holder_gone():
            if not held.expired():
                raise OperationError(f"NBD volume {uri} is being written by another "
                                     f"backup ({held.describe()})")
            if (current.generation, held.token) not in watched:
                watched.add((current.generation, held.token))
                raise retry.Again(held.ttl / 2)
        problem = space_problem(current, self.size)
        if problem is not None:
            raise VerificationError(f"NBD volume {uri}: free list is damaged ({problem})")
        if held is not None:
            log.warning("NBD volume %s: taking over the writer lease of %s: its "
                        "holder is gone", uri, held.describe())
        start = max(current.next_free, held.reserved if held is not None else 0)
        lost = held.taken if held is not None else ()
        # past, and outside the free regions, of what a lost holder may still write
        claim = Lease.mine(reserved=start, taken=lost)
        new = replace(current, generation=current.generation + 1, lease=claim)
        if time.monotonic() - began > CLAIM_WINDOW:
            raise retry.Again()  # too slow since the read: read again
        self._write_superblock(new)
        time.sleep(self.settle)  # a deliberate pause: a rival's claim lands meanwhile
        check = self._read_table()
        if check.generation != new.generation or check.lease != claim:
            holder = (check.lease.describe() if check.lease
                      else f"generation {check.generation}")
            raise OperationError(f"NBD volume {uri}: another backup took the writer "
                                 f"lease first ({holder})")
        HELD.add(claim.token)
        self._lease, self.superblock, self.next_free = claim, check, start
        self._free, self._taken, self._allocated = subtract(check.free, lost), list(lost), []
        self._start_heartbeat()

    def _held_table(self) -> Superblock:
        """The newest table of contents, which must still be the one of this writer's lease."""
        current = self._read_table()
        if (self._lease is None or current.generation != self.superblock.generation
                or current.lease is None or current.lease.token != self._lease.token):
            other = current.lease.describe() if current.lease else "no lease"
            raise OperationError(f"NBD volume {self.address.uri}: this backup lost its writer "
                                 f"lease (generation {current.generation}, {other}); "
                                 "nothing was published")
        return current

    def renew_lease(self) -> None:
        """Write the next generation with the lease renewed (raises when the lease was lost)."""
        with self._mutex:
            if self._lease is None:
                return
            current = self._held_table()
            lease = self._lease.renew(reserved=self.next_free, taken=tuple(self._taken))
            new = replace(current, generation=current.generation + 1, lease=lease)
            self._write_superblock(new)
            self._lease, self.superblock = lease, new

    def release_lease(self) -> None:
        """Give the lease back if still held (best effort: the holder may be gone already).

        A server that stopped answering holds any read or write of the superblock: after
        the stall limit the lease is left to expire (``ttl``) rather than waited for forever.
        """
        self._stop_heartbeat()
        worker = threading.Thread(target=self._release_now, name="rdmb-volume-release",
                                  daemon=True)
        worker.start()
        worker.join(stall_timeout())
        if worker.is_alive():
            log.info("NBD volume %s does not answer: its writer lease is left to expire",
                     self.address.uri)

    def _release_now(self) -> None:
        if not self._mutex.acquire(timeout=stall_timeout()):
            return
        with contextlib.ExitStack() as held:
            held.callback(self._mutex.release)
            if self._lease is None:
                return
            try:
                current = self._held_table()
                self._write_superblock(replace(current, generation=current.generation + 1,
                                               lease=None))
                HELD.discard(self._lease.token)
            except RdmBackupError as err:
                log.info("NBD volume %s: writer lease not released: %s", self.address.uri, err)
                HELD.discard(self._lease.token)
            self._lease = None

    def _start_heartbeat(self) -> None:
        assert self._lease is not None
        stop = self._beat = threading.Event()
        interval = self._lease.ttl / 3

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.renew_lease()
                except RdmBackupError as err:
                    log.info("heartbeat stopped: %s", err)  # the publication reports it
                    return

        threading.Thread(target=beat, name="rdmb-volume-lease", daemon=True).start()

    def _stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beat = None
