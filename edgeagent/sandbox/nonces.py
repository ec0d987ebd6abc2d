"""The sandbox's memory of request nonces: a nonce may not come again until its time is up (§2.5).

O(log n) per request: a set of the nonces in force plus a heap of (expiry, nonce) ordered by expiry;
expired nonces leave from the top of the heap, lazily, when a nonce is checked. Expiry times need
not arrive in order (each is the request's own timestamp + 300 s), which a heap allows and a FIFO
queue would not. The sandbox clock can jump (`date_offset_s`): a nonce then expires by the clock
it is checked against, as before.

Not thread-safe on its own: `Api` uses it under its lock.
"""

from __future__ import annotations

import heapq

MAX_NONCES = 1_000_000  # ~100 MB at worst; past it the nonce closest to expiry is forgotten first


class NonceMemory:
    """Which nonces were seen and until when they stay refused."""

    def __init__(self, limit: int = MAX_NONCES) -> None:
        if limit < 1:
            raise ValueError("limit: at least one nonce")
        self._limit = limit
        self._until: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def __contains__(self, nonce: object) -> bool:
        return nonce in self._until

    def expire(self, now: float) -> None:
        """Forget every nonce whose time is up (expiry ≤ `now`)."""
        heap, until = self._heap, self._until
        while heap and heap[0][0] <= now:
            _, nonce = heapq.heappop(heap)
            del until[nonce]

    def seen(self, nonce: str, until: float, now: float) -> bool:
        """True when `nonce` is still remembered at `now` (a replay); else remember it until `until`."""
        self.expire(now)
        if nonce in self._until:
            return True
        if until <= now:  # already expired: nothing to remember
            return False
        if len(self._until) >= self._limit:
            _, oldest = heapq.heappop(self._heap)
            del self._until[oldest]
        self._until[nonce] = until
        heapq.heappush(self._heap, (until, nonce))
        return False
