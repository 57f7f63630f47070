"""The keyed work queue: each guarantee of the module docstring, then a random workload.

Delays are small (tens of milliseconds). Assertions about time lean on the event loop's
own clock and on the order in which it fires timers, never on how fast the machine is: a
sleep that ends after a due time has passed that due time by the loop's clock, and an
elapsed time is only bounded from above by something far larger than the delay.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.workqueue import KeyedWorkQueue, QueueShutDown

SHORT = 0.05
# Far longer than SHORT: reaching it means a schedule was postponed, not a slow machine.
LONG = 30.0
# A bound for waits that should end almost at once; hitting it fails the test, not hangs it.
PATIENCE = 5.0


@pytest.fixture
async def queue():
    work_queue = KeyedWorkQueue()
    yield work_queue
    # Cancels any timer still armed, so nothing fires into a later test.
    work_queue.shut_down()


async def next_id(queue: KeyedWorkQueue) -> str:
    return await asyncio.wait_for(queue.get(), PATIENCE)


async def settle() -> None:
    """Let every task that is ready to run take its turn."""
    for _ in range(10):
        await asyncio.sleep(0)


# Handing out


async def test_an_id_added_many_times_is_handed_out_once(queue):
    for _ in range(5):
        queue.add("shop-42.sku-7")

    assert len(queue) == 1
    assert await next_id(queue) == "shop-42.sku-7"
    assert len(queue) == 0

    queue.done("shop-42.sku-7")
    assert len(queue) == 0


async def test_a_handed_out_id_is_marked_as_processing_until_done(queue):
    queue.add("a")

    key = await next_id(queue)
    assert queue.processing == frozenset({"a"})

    queue.done(key)
    assert queue.processing == frozenset()


async def test_distinct_ids_are_handed_out_in_the_order_they_were_first_added(queue):
    for key in ["c", "a", "b", "a", "c", "d"]:
        queue.add(key)

    handed_out = [await next_id(queue) for _ in range(4)]

    assert handed_out == ["c", "a", "b", "d"]


async def test_background_ids_wait_behind_every_added_one_and_an_add_moves_one_forward(queue):
    for key in ["r1", "r2", "r3"]:
        queue.add_background(key)
    queue.add_background("r1")
    queue.add("change")
    queue.add("r3")
    assert len(queue) == 4

    handed_out = [await next_id(queue) for _ in range(4)]

    assert handed_out == ["change", "r3", "r1", "r2"]


async def test_a_background_id_that_waits_or_is_processing_is_not_queued_again(queue):
    queue.add("a")
    queue.add_background("a")
    assert len(queue) == 1
    key = await next_id(queue)
    queue.add_background("a")
    assert len(queue) == 0
    queue.done(key)
    assert len(queue) == 0


async def test_an_id_is_never_handed_to_a_second_worker_while_the_first_holds_it(queue):
    queue.add("a")
    first = await next_id(queue)
    queue.add("a")

    second_worker = asyncio.create_task(queue.get())
    await settle()
    assert not second_worker.done()
    assert queue.processing == frozenset({"a"})

    queue.done(first)
    assert await asyncio.wait_for(second_worker, PATIENCE) == "a"


async def test_other_ids_are_handed_out_while_one_is_processing(queue):
    queue.add("a")
    await next_id(queue)
    queue.add("a")
    queue.add("b")

    assert await next_id(queue) == "b"
    assert queue.processing == frozenset({"a", "b"})


async def test_an_id_added_while_processing_is_handed_out_again_after_done_exactly_once(queue):
    queue.add("a")
    await next_id(queue)

    for _ in range(3):
        queue.add("a")
    assert len(queue) == 0

    queue.done("a")
    assert len(queue) == 1
    assert await next_id(queue) == "a"

    queue.done("a")
    assert len(queue) == 0
    assert queue.processing == frozenset()


async def test_an_id_not_added_while_processing_is_not_handed_out_again(queue):
    queue.add("a")
    await next_id(queue)

    queue.done("a")

    assert len(queue) == 0


async def test_a_requeued_id_goes_behind_the_ids_already_waiting(queue):
    queue.add("a")
    await next_id(queue)
    queue.add("a")
    queue.add("b")

    queue.done("a")

    assert [await next_id(queue), await next_id(queue)] == ["b", "a"]


async def test_a_waiting_worker_is_woken_by_an_add(queue):
    worker = asyncio.create_task(queue.get())
    await settle()
    assert not worker.done()

    queue.add("a")

    assert await asyncio.wait_for(worker, PATIENCE) == "a"


async def test_each_of_several_waiting_workers_gets_a_different_id(queue):
    workers = [asyncio.create_task(queue.get()) for _ in range(3)]
    await settle()

    queue.add("a")
    queue.add("b")
    await settle()

    finished = [worker for worker in workers if worker.done()]
    assert sorted(worker.result() for worker in finished) == ["a", "b"]

    (still_waiting,) = [worker for worker in workers if not worker.done()]
    queue.add("c")
    assert await asyncio.wait_for(still_waiting, PATIENCE) == "c"


# Scheduling with add_after


async def test_add_after_hands_the_id_out_once_the_delay_has_passed(queue):
    loop = asyncio.get_running_loop()
    scheduled_at = loop.time()

    queue.add_after("a", SHORT)

    assert await next_id(queue) == "a"
    elapsed = loop.time() - scheduled_at
    assert SHORT <= elapsed < PATIENCE


async def test_add_after_holds_the_id_back_while_the_delay_runs(queue):
    queue.add_after("a", LONG)
    queue.add("b")

    await asyncio.sleep(SHORT)

    assert len(queue) == 1
    assert await next_id(queue) == "b"
    assert len(queue) == 0


async def test_add_after_hands_the_id_out_only_once(queue):
    queue.add_after("a", SHORT)
    assert await next_id(queue) == "a"
    queue.done("a")

    await asyncio.sleep(3 * SHORT)

    assert len(queue) == 0


async def test_an_add_beats_a_pending_add_after(queue):
    queue.add_after("a", SHORT)

    queue.add("a")

    assert len(queue) == 1
    assert await next_id(queue) == "a"
    queue.done("a")
    # Past the scheduled time, the superseded schedule must not hand the id out again.
    await asyncio.sleep(3 * SHORT)
    assert len(queue) == 0


async def test_add_after_of_an_id_already_waiting_is_ignored(queue):
    queue.add("a")

    queue.add_after("a", SHORT)

    assert await next_id(queue) == "a"
    queue.done("a")
    await asyncio.sleep(3 * SHORT)
    assert len(queue) == 0


# A marker id scheduled between the two delays shows which schedule handed "a" out, by
# order rather than by elapsed time, so a slow machine cannot change the outcome.


async def test_an_earlier_add_after_wins_over_a_later_one(queue):
    queue.add_after("a", 6 * SHORT)
    queue.add_after("marker", 3 * SHORT)

    queue.add_after("a", SHORT)

    assert [await next_id(queue), await next_id(queue)] == ["a", "marker"]
    queue.done("a")
    # The superseded schedule comes due during this sleep and must not hand the id out.
    await asyncio.sleep(10 * SHORT)
    assert len(queue) == 0


async def test_a_later_add_after_does_not_postpone_an_earlier_one(queue):
    queue.add_after("a", SHORT)
    queue.add_after("marker", 3 * SHORT)

    queue.add_after("a", LONG)

    assert [await next_id(queue), await next_id(queue)] == ["a", "marker"]


async def test_add_after_schedules_distinct_ids_in_the_order_they_come_due(queue):
    queue.add_after("late", 3 * SHORT)
    queue.add_after("early", SHORT)

    await asyncio.sleep(6 * SHORT)

    assert [await next_id(queue), await next_id(queue)] == ["early", "late"]


async def test_add_after_of_an_id_being_processed_hands_it_out_after_done(queue):
    queue.add("a")
    await next_id(queue)

    queue.add_after("a", SHORT)
    await asyncio.sleep(3 * SHORT)
    assert len(queue) == 0

    queue.done("a")
    assert await next_id(queue) == "a"
    queue.done("a")
    assert len(queue) == 0


@pytest.mark.parametrize("delay", [0, 0.0, -1.0])
async def test_add_after_without_a_positive_delay_is_an_add(queue, delay):
    queue.add("first")

    queue.add_after("a", delay)

    assert len(queue) == 2
    assert [await next_id(queue), await next_id(queue)] == ["first", "a"]


async def test_add_after_without_a_positive_delay_while_processing_requeues_after_done(queue):
    queue.add("a")
    await next_id(queue)

    queue.add_after("a", 0)

    assert len(queue) == 0
    queue.done("a")
    assert await next_id(queue) == "a"


# Shutting down


async def test_shut_down_wakes_every_waiting_worker_with_queue_shut_down(queue):
    workers = [asyncio.create_task(queue.get()) for _ in range(3)]
    await settle()

    queue.shut_down()

    for worker in workers:
        with pytest.raises(QueueShutDown):
            await asyncio.wait_for(worker, PATIENCE)


async def test_get_after_shut_down_raises_even_with_ids_waiting(queue):
    queue.add("a")

    queue.shut_down()

    with pytest.raises(QueueShutDown):
        await next_id(queue)


async def test_adds_after_shut_down_are_ignored(queue):
    queue.shut_down()

    queue.add("a")
    queue.add_after("b", 0)
    queue.add_after("c", SHORT)
    await asyncio.sleep(3 * SHORT)

    assert len(queue) == 0


async def test_shut_down_drops_pending_add_after(queue):
    queue.add_after("a", SHORT)

    queue.shut_down()
    await asyncio.sleep(3 * SHORT)

    assert len(queue) == 0


async def test_done_after_shut_down_does_not_requeue_an_id_added_while_processing(queue):
    queue.add("a")
    await next_id(queue)
    queue.add("a")
    queue.shut_down()

    queue.done("a")

    assert len(queue) == 0
    assert queue.processing == frozenset()


# A random workload against a model

KEYS = ["a", "b", "c", "d"]
# The largest delay of the workload; the drain waits well past it.
MAX_DELAY = 0.002

adds = st.tuples(st.just("add"), st.sampled_from(KEYS), st.just(0.0))
scheduled_adds = st.tuples(
    st.just("add_after"), st.sampled_from(KEYS), st.sampled_from([-0.001, 0.0, 0.001, MAX_DELAY])
)
pauses = st.tuples(st.just("pause"), st.just(""), st.sampled_from([0.0, 0.001]))
operations = st.lists(st.one_of(adds, scheduled_adds, pauses), max_size=60)
# How each processing ends: after a few turns of the loop, or after a real (short) sleep
# during which scheduled adds can come due.
holds = st.lists(st.sampled_from([0, 1, 3, 0.001]), min_size=1, max_size=20)


@dataclass
class History:
    """What happened, in order: each entry is ("add", key) or ("start", key)."""

    entries: list[tuple[str, str]] = field(default_factory=list)
    in_progress: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)


async def run_workload(
    *, workers: int, script: list[tuple[str, str, float]], hold_pattern: list[float]
) -> History:
    queue = KeyedWorkQueue()
    history = History()
    holds_taken = 0

    async def worker() -> None:
        nonlocal holds_taken
        while True:
            try:
                key = await queue.get()
            except QueueShutDown:
                return
            if key in history.in_progress:
                history.overlaps.append(key)
            history.in_progress.add(key)
            history.entries.append(("start", key))
            hold = hold_pattern[holds_taken % len(hold_pattern)]
            holds_taken += 1
            try:
                if isinstance(hold, float):
                    await asyncio.sleep(hold)
                else:
                    for _ in range(hold):
                        await asyncio.sleep(0)
            finally:
                history.in_progress.discard(key)
                queue.done(key)

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]

    for operation, key, amount in script:
        if operation == "add":
            history.entries.append(("add", key))
            queue.add(key)
        elif operation == "add_after":
            history.entries.append(("add", key))
            queue.add_after(key, amount)
        else:
            await asyncio.sleep(amount)

    # Every schedule comes due before this sleep ends; then wait for the workers to drain.
    await asyncio.sleep(5 * MAX_DELAY)
    while len(queue) or queue.processing:
        await asyncio.sleep(0.001)

    queue.shut_down()
    await asyncio.gather(*tasks)
    return history


def run_in_own_loop(coroutine):
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(coroutine, 30))
    finally:
        loop.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workers=st.integers(min_value=1, max_value=4), script=operations, hold_pattern=holds)
def test_random_workload_never_overlaps_and_processes_every_add(workers, script, hold_pattern):
    history = run_in_own_loop(
        run_workload(workers=workers, script=script, hold_pattern=hold_pattern)
    )

    assert history.overlaps == []

    added_since_start: dict[str, bool] = {}
    for entry, key in history.entries:
        if entry == "add":
            added_since_start[key] = True
        else:
            # A processing starts only for an id added since its previous processing started.
            assert added_since_start.get(key), f"{key} processed without an add before it"
            added_since_start[key] = False
    # No add is left without a processing that started after it.
    assert not any(added_since_start.values()), added_since_start
