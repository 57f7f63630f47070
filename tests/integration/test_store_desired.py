"""Desired-state writes made together share one transaction and come out exactly as the
same records written one at a time would."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from streams.configs import Tombstone, config_from_json_dict
from reconciler.store import Store
from reconciler.versions import Verdict
from tests.integration.harness import config_doc

pytestmark = pytest.mark.integration

CONFIGS = 12
RECORDS = 400


def random_records(prefix: str, seed: int) -> list:
    """(record, offset) pairs on one partition: enable flips, interval and source changes,
    versions going up, down and repeating, tombstones, and offsets already applied."""
    rng = random.Random(seed)
    versions = {n: 0 for n in range(CONFIGS)}
    records = []
    for offset in range(RECORDS):
        n = rng.randrange(CONFIGS)
        config_id = f"{prefix}{n}"
        if rng.random() < 0.1:
            records.append((Tombstone(config_id), offset))
            continue
        versioned = n % 3 != 0
        if versioned:
            versions[n] += rng.choice([-1, 0, 1, 1, 2])
        doc = config_doc(
            config_id,
            url=rng.choice(["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]),
            enabled=rng.random() < 0.6,
            interval=rng.choice([1, 1.0, 2]),
            product=f"p{n}",
            version=max(0, versions[n]) if versioned else None,
        )
        # A replayed offset now and then: the row must ignore it.
        replayed = offset - rng.randrange(1, 5) if rng.random() < 0.05 and offset > 5 else offset
        records.append((config_from_json_dict(doc, expected_id=config_id), replayed))
    return records


def runs_of_distinct_configs(records: list) -> int:
    runs, seen = 1, set()
    for record, _ in records:
        if record.id in seen:
            runs, seen = runs + 1, set()
        seen.add(record.id)
    return runs


async def rows_of(store: Store, prefix: str) -> dict[str, tuple]:
    rows = await store.pool.fetch(
        """SELECT config_id, enabled, deleted, config - 'id' AS config, config_version, state,
                  cursor, last_pull_at IS NULL, attempts, retry_at IS NULL, source_offset
           FROM pull_tasks WHERE config_id LIKE $1 || '%'""",
        prefix,
    )
    return {row["config_id"][len(prefix):]: tuple(row)[1:] for row in rows}


async def give_every_row_a_cursor_and_a_backoff(store: Store, prefix: str) -> None:
    await store.pool.execute(
        """UPDATE pull_tasks SET cursor = 'c-7', last_pull_at = now(), attempts = 2,
                  retry_at = now() + interval '1 minute',
                  state = CASE WHEN deleted THEN state ELSE 'backoff' END
           WHERE config_id LIKE $1 || '%'""",
        prefix,
    )


async def test_records_written_together_end_as_the_same_records_written_one_at_a_time(
    database_url: str,
) -> None:
    store = await Store.connect(database_url, instance_id="a", boot_id=uuid.uuid4().hex,
                                pool_size=2, timeout=10)
    try:
        await store.migrate()
        transactions = 0
        write_batch = store._write_desired_batch

        async def counted(batch):
            nonlocal transactions
            transactions += 1
            return await write_batch(batch)

        store._write_desired_batch = counted
        for seed in range(3):
            one, together = f"one{seed}-", f"all{seed}-"
            records = random_records(one, seed), random_records(together, seed)
            half = RECORDS // 2
            verdicts_one = []
            for phase in (slice(0, half), slice(half, None)):
                for record, offset in records[0][phase]:
                    written = await store.write_desired(record, partition=0, offset=offset,
                                                        record_time=None)
                    verdicts_one.append(written)
                await give_every_row_a_cursor_and_a_backoff(store, one)
            transactions = 0
            verdicts_together = []
            for phase in (slice(0, half), slice(half, None)):
                verdicts_together += await asyncio.gather(*(
                    store.write_desired(record, partition=0, offset=offset, record_time=None)
                    for record, offset in records[1][phase]
                ))
                await give_every_row_a_cursor_and_a_backoff(store, together)

            assert [(w.judgement.verdict, w.changed) for w in verdicts_together] == [
                (w.judgement.verdict, w.changed) for w in verdicts_one]
            assert [w.judgement.why for w in verdicts_together] == [
                (w.judgement.why or "").replace(one, together) or None for w in verdicts_one]
            assert await rows_of(store, together) == await rows_of(store, one)
            # A config's second record starts a new transaction, and nothing else does.
            assert transactions == sum(
                runs_of_distinct_configs(records[1][phase])
                for phase in (slice(0, half), slice(half, None)))
            assert {w.judgement.verdict for w in verdicts_one} == set(Verdict)
    finally:
        await store.close()
