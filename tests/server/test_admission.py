"""Fair admission: per-tenant shares (429), the bounded whole (503), per-minute budgets, Retry-After, and
slots handed to the tenant running the fewest requests."""

import asyncio

import pytest

from server.admission import Admission, RateLimits
from server.errors import ServerBusy, TenantOverLimit
from tests.server.conftest import assert_error, auth, server_settings


class Clock:
    """Time the test moves by hand, so per-minute budgets are checked without sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _hold(admission: Admission, tenant: str, release: asyncio.Event, started: list | None = None):
    async with admission.slot(tenant):
        if started is not None:
            started.append(tenant)
        await release.wait()


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_tenant_over_its_share_gets_429_while_others_are_still_admitted():
    async def scenario():
        admission = Admission(slots=2, queue=4, tenant_slots=1, tenant_queue=1)
        release = asyncio.Event()
        busy = [asyncio.create_task(_hold(admission, "busy", release)) for _ in range(2)]  # 1 running, 1 queued
        await _settle()
        with pytest.raises(TenantOverLimit) as refused:
            async with admission.slot("busy"):
                pass
        assert refused.value.http_status == 429 and refused.value.code == "tenant_share"
        assert refused.value.retry_after >= 1 and "'busy'" in str(refused.value)
        started = []
        quiet = asyncio.create_task(_hold(admission, "quiet", release, started))
        await _settle()
        assert started == ["quiet"]  # served at once: the busy tenant cannot take the second slot
        release.set()
        await asyncio.gather(*busy, quiet)

    asyncio.run(scenario())


def test_the_whole_full_is_503_with_retry_after_and_slots_free_again():
    async def scenario():
        admission = Admission(slots=1, queue=1)
        release = asyncio.Event()
        held = [asyncio.create_task(_hold(admission, tenant, release)) for tenant in ("a", "b")]
        await _settle()
        with pytest.raises(ServerBusy) as refused:
            async with admission.slot("c"):
                pass
        assert refused.value.http_status == 503 and refused.value.retry_after >= 1
        release.set()
        await asyncio.gather(*held)
        async with admission.slot("c"):  # everything released
            pass

    asyncio.run(scenario())


def test_a_freed_slot_goes_to_the_tenant_running_fewest_not_the_longest_queue():
    async def scenario():
        admission = Admission(slots=2, queue=10)
        releases = {name: asyncio.Event() for name in ("a1", "a2")}
        order: list[str] = []
        first = [asyncio.create_task(_hold(admission, "a", releases[name])) for name in ("a1", "a2")]
        await _settle()
        never = asyncio.Event()
        a_backlog = [asyncio.create_task(_hold(admission, "a", never, order)) for _ in range(4)]
        await _settle()
        b = asyncio.create_task(_hold(admission, "b", never, order))  # arrives after a's whole backlog
        await _settle()
        releases["a1"].set()
        await _settle()
        assert order == ["b"]  # a FIFO semaphore would have served a's oldest waiter
        releases["a2"].set()
        await _settle()
        assert order == ["b", "a"]
        for task in a_backlog + [b]:
            task.cancel()
        await asyncio.gather(*first, *a_backlog, b, return_exceptions=True)
        assert admission._running == 0 and admission._admitted == 0  # cancelled waiters left no trace

    asyncio.run(scenario())


def test_requests_per_minute_refuses_with_the_time_until_the_next_one():
    async def scenario():
        clock = Clock()
        limits = {"metered": RateLimits(requests_per_minute=2)}
        admission = Admission(slots=4, queue=4, limits=lambda t: limits.get(t, RateLimits()), clock=clock)
        for _ in range(2):
            async with admission.slot("metered"):
                pass
        with pytest.raises(TenantOverLimit) as refused:
            async with admission.slot("metered"):
                pass
        assert refused.value.code == "requests_per_minute" and refused.value.retry_after == pytest.approx(30)
        async with admission.slot("free"):  # other tenants have no budget
            pass
        clock.now += 30
        async with admission.slot("metered"):
            pass

    asyncio.run(scenario())


def test_tokens_per_minute_counts_answers_and_refuses_until_refilled():
    async def scenario():
        clock = Clock()
        admission = Admission(slots=4, queue=4, limits=lambda t: RateLimits(tokens_per_minute=600), clock=clock)
        async with admission.slot("acme"):
            admission.charge_tokens("acme", 900)  # one long answer overdraws the minute by 300
        with pytest.raises(TenantOverLimit) as refused:
            async with admission.slot("acme"):
                pass
        assert refused.value.code == "tokens_per_minute" and refused.value.retry_after == pytest.approx(30.1)
        clock.now += 31
        async with admission.slot("acme"):
            pass

    asyncio.run(scenario())


def test_http_429_and_503_carry_retry_after(corpus, extractive_generator):
    from fastapi.testclient import TestClient

    from server.app import create_app

    settings = server_settings(corpus, requests_per_minute=1, tenant_limits={
        "beta": {"requests_per_minute": 100, "tokens_per_minute": 100_000}})
    payload = {"model": "lorag", "messages": [{"role": "user", "content": "What is the beta launch code?"}]}
    with TestClient(create_app(settings, retrieval=corpus.retrieval, generator=extractive_generator)) as client:
        assert client.post("/v1/chat/completions", json=payload, headers=auth(corpus.acme_key)).status_code == 200
        refused = client.post("/v1/chat/completions", json=payload, headers=auth(corpus.acme_key))
        error = assert_error(refused, 429, error_type="rate_limit_error")
        assert error["code"] == "requests_per_minute" and "1 chat requests per minute" in error["message"]
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        for _ in range(3):  # beta's own entry overrides the server-wide budget
            assert client.post("/v1/chat/completions", json=payload, headers=auth(corpus.beta_key)).status_code == 200
        metrics = client.get("/metrics", headers=auth(corpus.admin_key)).text
        assert 'lorag_chat_rate_limited_total{reason="requests_per_minute"} 1.0' in metrics
        # The answers' prompt + completion tokens were counted against beta's budget: overdraw it, then 429.
        used = client.app.state.services.queue._tenants["beta"].tokens
        assert used.capacity - used.level > 3 * 10  # three answers, each well over ten tokens
        client.app.state.services.queue.charge_tokens("beta", 200_000)  # a minute in debt
        refused = client.post("/v1/chat/completions", json=payload, headers=auth(corpus.beta_key))
        assert assert_error(refused, 429)["code"] == "tokens_per_minute"
        assert int(refused.headers["Retry-After"]) >= 1

    starting = create_app(server_settings(corpus), retrieval=corpus.retrieval, generator=extractive_generator)
    with TestClient(starting) as client:
        starting.state.services.chat, chat = None, starting.state.services.chat  # as while the model loads
        busy = client.post("/v1/chat/completions", json=payload, headers=auth(corpus.acme_key))
        starting.state.services.chat = chat
        assert_error(busy, 503)
        assert busy.headers["Retry-After"] == "1"


def test_a_full_queue_makes_room_for_a_tenant_holding_less_by_refusing_the_hogs_newest_waiter():
    async def scenario():
        admission = Admission(slots=1, queue=3)
        release = asyncio.Event()
        hog = [asyncio.create_task(_hold(admission, "hog", release)) for _ in range(4)]  # 1 running, 3 queued
        await _settle()
        started = []
        late = asyncio.create_task(_hold(admission, "late", release, started))  # full: the hog's newest leaves
        await _settle()
        assert hog[-1].done() and not hog[0].done()
        with pytest.raises(TenantOverLimit) as refused:
            hog[-1].result()
        assert refused.value.code == "tenant_share" and "'late' waits" in str(refused.value)
        other = asyncio.create_task(_hold(admission, "other", release, started))  # hog 3 > other 0 + 1: again
        await _settle()
        assert hog[-2].done() and not hog[1].done()
        with pytest.raises(ServerBusy):  # hog 2, late 1, other 1: everyone near an equal share, so 503
            async with admission.slot("late"):
                pass
        release.set()
        await asyncio.gather(late, other, *hog[:-2])
        assert started == ["late", "other"]
        assert admission._running == 0 and admission._admitted == 0

    asyncio.run(scenario())
