"""Fair admission of chat requests: a share of the generation slots and of the queue per tenant, optional
requests-per-minute and tokens-per-minute limits per tenant (429), and a bounded whole (503).

Every refusal carries ``retry_after`` (seconds), which the HTTP edge sends as ``Retry-After``.
Slots are handed out tenant by tenant: when one frees, the waiting tenant running the fewest requests
gets it (the oldest waiter breaks ties), so a tenant with a deep backlog cannot starve one with a short one.
asyncio.Semaphore wakes waiters in arrival order only, hence the hand-written queue here.
"""

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from itertools import count

from server.errors import ServerBusy, TenantOverLimit
from server.metrics import Metrics

MAX_RETRY_AFTER_S = 60
_SMOOTHING = 0.2  # weight of the newest request in the running mean of how long a slot is held


@dataclass(frozen=True)
class RateLimits:
    """A tenant's per-minute budgets; None is unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


class RateBucket:
    """A token bucket holding at most one minute's budget and refilling continuously.

    ``charge`` may take it below zero (tokens are counted after the answer, whose length was not known
    before); the tenant then waits until it is refilled above zero.
    """

    def __init__(self, per_minute: int, *, now: float):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # per second
        self.level = self.capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def wait_s(self, now: float, amount: float = 1) -> float:
        """Seconds until ``amount`` is in the bucket (0: it is now)."""
        self._refill(now)
        return max(0.0, amount - self.level) / self.rate

    def charge(self, now: float, amount: float) -> None:
        self._refill(now)
        self.level -= amount


@dataclass(eq=False)
class _TenantState:
    running: int = 0
    admitted: int = 0  # running + waiting
    waiting: deque = field(default_factory=deque)  # (arrival number, future) in arrival order
    requests: RateBucket | None = None
    tokens: RateBucket | None = None


class Admission:
    """Admits chat requests per tenant.

    ``slots`` requests generate at once and ``queue`` more wait, across all tenants. One tenant holds at
    most ``tenant_slots`` of the slots and ``tenant_queue`` places in the queue: past that it gets 429
    while other tenants are still served; past the whole, everyone gets 503. ``limits(tenant)`` gives a
    tenant's per-minute budgets (read once, when the tenant is first seen).
    """

    def __init__(self, *, slots: int, queue: int, tenant_slots: int | None = None, tenant_queue: int | None = None,
                 limits: Callable[[str], RateLimits] = lambda tenant: RateLimits(), metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.slots = slots
        self.capacity = slots + queue
        self.tenant_slots = min(slots, tenant_slots or slots)
        self.tenant_capacity = self.tenant_slots + (queue if tenant_queue is None else tenant_queue)
        self._limits = limits
        self._metrics = metrics
        self._clock = clock
        self._tenants: dict[str, _TenantState] = {}
        self._running = 0
        self._admitted = 0
        self._arrivals = count()
        self._hold_s = 1.0  # running mean of how long a request keeps its slot; sizes Retry-After

    # -- the one entry point ---------------------------------------------------------------------
    @asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one generation slot for ``tenant`` for the block, waiting for it in the tenant's queue.

        Raises:
            TenantOverLimit: (429) the tenant is over its requests or tokens per minute, or holds its whole
                share of slots and queue.
            ServerBusy: (503) all slots and the whole queue are taken.
        """
        state = self._state(tenant)
        self._admit(tenant, state)
        state.admitted += 1
        self._admitted += 1
        if self._metrics:
            self._metrics.queued.inc()
        waiting = True
        try:
            await self._acquire(state)
            waiting = False
            if self._metrics:
                self._metrics.queued.dec()
                self._metrics.in_flight.inc()
            started = self._clock()
            try:
                yield
            finally:
                held = self._clock() - started
                self._hold_s += _SMOOTHING * (held - self._hold_s)
                if self._metrics:
                    self._metrics.in_flight.dec()
                self._release(state)
        finally:
            state.admitted -= 1
            self._admitted -= 1
            if waiting and self._metrics:  # cancelled or refused while queued
                self._metrics.queued.dec()

    def charge_tokens(self, tenant: str, tokens: int) -> None:
        """Count ``tokens`` (prompt + answer) against the tenant's tokens per minute."""
        state = self._state(tenant)
        if state.tokens is not None and tokens > 0:
            state.tokens.charge(self._clock(), tokens)

    # -- admission ---------------------------------------------------------------------------------
    def _state(self, tenant: str) -> _TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            limits = self._limits(tenant)
            now = self._clock()
            state = _TenantState(
                requests=RateBucket(limits.requests_per_minute, now=now) if limits.requests_per_minute else None,
                tokens=RateBucket(limits.tokens_per_minute, now=now) if limits.tokens_per_minute else None,
            )
            self._tenants[tenant] = state
        return state

    def _admit(self, tenant: str, state: _TenantState) -> None:
        now = self._clock()
        for bucket, what, code in ((state.requests, "chat requests", "requests_per_minute"),
                                   (state.tokens, "tokens", "tokens_per_minute")):
            wait = bucket.wait_s(now) if bucket is not None else 0.0
            if wait > 0:
                self._refuse_rate(code)
                raise TenantOverLimit(
                    f"tenant {tenant!r} is over its limit of {int(bucket.capacity)} {what} per minute "
                    f"(server.{code})", retry_after=wait, code=code)
        if state.admitted >= self.tenant_capacity:
            self._refuse_rate("tenant_share")
            raise TenantOverLimit(
                f"tenant {tenant!r} already has {state.admitted} chat requests running or queued, its whole share "
                "(server.tenant_concurrency_share, server.tenant_queue_share)",
                retry_after=self._estimate(state.admitted - self.tenant_slots + 1, self.tenant_slots),
                code="tenant_share")
        if self._admitted >= self.capacity and not self._push_out(tenant, state):
            if self._metrics:
                self._metrics.rejected.inc()
            raise ServerBusy(
                f"server busy: {self._admitted} chat requests already running or queued "
                "(server.max_concurrent_requests + server.max_queued_requests)",
                hint="Retry after the time in the Retry-After header",
                retry_after=self._estimate(self._admitted - self.slots + 1, self.slots))
        if state.requests is not None:
            state.requests.charge(now, 1)

    def _push_out(self, tenant: str, state: _TenantState) -> bool:
        """Make room in a full queue for ``tenant`` when another tenant holds more than one request more than it:
        that tenant's newest waiter leaves with 429. Without this, whoever filled the queue first keeps it
        full (each answer is followed by its client's next request) and a late tenant only ever sees 503."""
        hogs = [s for s in self._tenants.values() if s.waiting and s is not state]
        if not hogs:
            return False
        hog = max(hogs, key=lambda s: (s.admitted, -s.waiting[-1][0]))
        if hog.admitted <= state.admitted + 1:
            return False
        granted = hog.waiting.pop()[1]
        while granted.done() and hog.waiting:  # a waiter cancelled but not yet woken up to leave
            granted = hog.waiting.pop()[1]
        if granted.done():
            return False
        name = next(name for name, s in self._tenants.items() if s is hog)
        self._refuse_rate("tenant_share")
        granted.set_exception(TenantOverLimit(
            f"tenant {name!r} has {hog.admitted} chat requests running or queued on a full server, more than its "
            f"share while tenant {tenant!r} waits (server.max_queued_requests)",
            retry_after=self._estimate(hog.admitted - self.tenant_slots, self.tenant_slots), code="tenant_share"))
        return True

    def _estimate(self, ahead: int, slots: int) -> float:
        """Seconds until ``ahead`` requests in front have drained through ``slots`` slots."""
        return min(MAX_RETRY_AFTER_S, max(1.0, self._hold_s * max(ahead, 1) / max(slots, 1)))

    def _refuse_rate(self, reason: str) -> None:
        if self._metrics:
            self._metrics.rate_limited.labels(reason).inc()

    # -- slots -------------------------------------------------------------------------------------
    async def _acquire(self, state: _TenantState) -> None:
        if self._running < self.slots and state.running < self.tenant_slots and not state.waiting:
            self._grant(state)
            return
        granted = asyncio.get_running_loop().create_future()
        entry = (next(self._arrivals), granted)
        state.waiting.append(entry)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                # the slot came just as the waiter was cancelled
                self._release(state)
            elif entry in state.waiting:
                state.waiting.remove(entry)
            raise

    def _grant(self, state: _TenantState) -> None:
        self._running += 1
        state.running += 1

    def _release(self, state: _TenantState) -> None:
        self._running -= 1
        state.running -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand free slots to waiters: the eligible tenant running the fewest requests first."""
        while self._running < self.slots:
            eligible = [s for s in self._tenants.values() if s.waiting and s.running < self.tenant_slots]
            if not eligible:
                return
            state = min(eligible, key=lambda s: (s.running, s.waiting[0][0]))
            _, granted = state.waiting.popleft()
            if granted.done():  # its waiter was cancelled and has not woken up to leave the queue yet
                continue
            self._grant(state)
            granted.set_result(None)
