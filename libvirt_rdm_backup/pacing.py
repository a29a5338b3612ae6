"""Pacing of reads no QEMU job limits: ``--bwlimit`` for the read-back of a resync.

QEMU's jobs take the limit as their ``speed``; reads the package makes itself through
libnbd are held to it by a :class:`Pacer`: on average over the whole run, since the first
read, no more than the limit, one read request (4 MiB) at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

MiB = 1024 * 1024


class Pacer:
    """Holds reads to ``speed`` bytes per second on average since the first one: before a
    read, :meth:`take` sleeps until the bytes taken before it are due (their count divided
    by ``speed`` seconds after the first take). ``clock`` and ``sleep`` are injectable."""

    def __init__(self, speed: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if speed <= 0:
            raise ValueError(f"a pace needs a positive speed, not {speed}")
        self.speed = speed
        self.taken = 0  # bytes taken so far
        self.waited = 0.0  # seconds slept so far
        self._clock, self._sleep = clock, sleep
        self._start: float | None = None

    def take(self, length: int) -> None:
        """Wait until a read of ``length`` bytes keeps within the pace, then count it."""
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self.taken / self.speed
        if due > now:
            self._sleep(due - now)
            self.waited += due - now
        self.taken += length

    def describe(self) -> str:
        """The pace and what it cost, for a log line."""
        return (f"{self.taken} bytes read at most {self.speed / MiB:g} MiB/s "
                f"({self.waited:.2f} s waited)")


def paced(requests: Iterable[tuple[int, int, bool]], pacer: Pacer, most: int | None = None
          ) -> Iterator[tuple[int, int, bool]]:
    """Read requests ``(offset, length, reads as zero)`` as they come, each one that reads
    data taken from ``pacer`` first (one reading as zero reads nothing); with ``most``, a
    longer data request is cut into requests of at most that many bytes, each paced."""
    for request in requests:
        offset, length, zero = request
        if zero:
            yield request
            continue
        step = length if most is None else most
        for start in range(offset, offset + length, step):
            part = min(step, offset + length - start)
            pacer.take(part)
            yield start, part, False
