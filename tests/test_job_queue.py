"""The sender's job queue: what wakes the producer, what ends the lanes, what take_next takes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from newsletter.send import Job, JobQueue


def job(n: int, campaign_id: int = 1) -> Job:
    """A job for delivery n (nothing is sent: only the queue handles it)."""
    return Job(
        delivery_id=n,
        campaign_id=campaign_id,
        subscriber_id=n,
        email=f"reader{n}@example.net",
        attempts=0,
        retry_from=datetime(2026, 12, 6, tzinfo=UTC),
        envelope_from="bounces@example.org",
        message=b"",
    )


def test_the_producer_wakes_at_the_low_mark_not_before() -> None:
    """Waiting for the queue to be down to 2 of 5: three takes do it, and the producer looks
    only twice (at first, and at the mark), not at every take."""

    async def go() -> tuple[list[bool], list[int]]:
        queue = JobQueue()
        queue.put(job(n) for n in range(5))
        looked: list[int] = []

        def down_to_two() -> bool:
            looked.append(len(queue))
            return len(queue) <= 2

        waiter = asyncio.create_task(queue.wait_until(down_to_two, low=2))
        seen = []
        for _ in range(3):
            await asyncio.sleep(0)
            seen.append(waiter.done())
            await queue.take()
        await asyncio.wait_for(waiter, 1)
        return seen, looked

    assert asyncio.run(go()) == ([False, False, False], [5, 2])


def test_the_producer_wakes_when_the_last_job_is_done() -> None:
    """Waiting for idle: taken is not enough, the last `done` is."""

    async def go() -> tuple[bool, bool]:
        queue = JobQueue()
        queue.put([job(1)])
        waiter = asyncio.create_task(queue.wait_until(queue.idle))
        await queue.take()
        await asyncio.sleep(0.01)
        taken = waiter.done()
        queue.done()
        await asyncio.wait_for(waiter, 1)
        return taken, queue.idle()

    assert asyncio.run(go()) == (False, True)


def test_close_ends_lanes_waiting_on_an_empty_queue() -> None:
    """Lanes waiting for work get None once the queue is closed; a job put first is taken."""

    async def go() -> list[Job | None]:
        queue = JobQueue()
        lanes = [asyncio.create_task(queue.take()) for _ in range(3)]
        await asyncio.sleep(0.01)
        queue.put([job(7)])
        queue.close()
        return await asyncio.wait_for(asyncio.gather(*lanes), 1)

    got = asyncio.run(go())
    assert sorted(j.delivery_id for j in got if j is not None) == [7]
    assert got.count(None) == 2


def test_take_next_takes_the_head_only_when_accepted() -> None:
    """take_next never skips ahead (alerts first stays true): refused, the head stays first."""

    async def go() -> tuple[Job | None, Job | None, Job | None, int]:
        queue = JobQueue()
        queue.put([job(1, campaign_id=10), job(2, campaign_id=20)])
        refused = queue.take_next(lambda j: j.campaign_id == 20)
        taken = queue.take_next(lambda j: j.campaign_id == 10)
        after = await queue.take()
        return refused, taken, after, len(queue)

    refused, taken, after, left = asyncio.run(go())
    assert refused is None
    assert taken is not None and taken.delivery_id == 1
    assert after is not None and after.delivery_id == 2
    assert left == 0
