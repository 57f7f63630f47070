"""PostgreSQL: the `pull_tasks` table (desired state, actual state, leases, cursors) and the
outbox of lifecycle events.

Every statement that acts for a run names the run's `run_id` and fencing number in its
`WHERE`, so a write from a run whose lease was taken over matches no row and fails. Time is
the database's: lease expiry, backoff and the last pull are compared with `now()` inside the
statements, never with this process's clock.

Lifecycle events are inserted into `lifecycle_outbox` in the same transaction as the state
change they report; `reconciler.outbox` sends them to Kafka and deletes them once acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import asyncpg

from streams.configs import Config, Tombstone, config_from_json_dict
from reconciler.versions import Judgement, StoredDesired, Verdict, judge_config, judge_tombstone

log = logging.getLogger(__name__)

ACTIVE_STATES = ("starting", "running", "stopping")

# NOTIFY channel on which a released lease announces its config id.
LEASE_CHANNEL = "reconciler_lease_released"
# A session idle inside one of the store's transactions longer than this is ended by
# PostgreSQL, and its row locks with it: an instance frozen (or cut off) between two
# statements must not hold the rows its successors take over once its leases expire (after
# 10 s by default). A healthy instance sends a transaction's next statement within
# milliseconds. Set per transaction, not per session: single statements need no bound.
IDLE_IN_TRANSACTION_SECONDS = 10.0

MIGRATIONS: list[str] = [
    """
    CREATE TABLE pull_tasks (
        config_id         text PRIMARY KEY,
        enabled           boolean NOT NULL DEFAULT false,
        config            jsonb,
        config_version    bigint,
        deleted           boolean NOT NULL DEFAULT false,
        source_partition  integer,
        source_offset     bigint,
        record_time       timestamptz,
        state             text NOT NULL DEFAULT 'stopped' CHECK (state IN
                              ('starting', 'running', 'stopping', 'stopped', 'failed',
                               'backoff', 'deleted')),
        run_id            text,
        fence             bigint NOT NULL DEFAULT 0,
        owner             text,
        owner_boot        text,
        lease_expires_at  timestamptz,
        started_at        timestamptz,
        stopped_at        timestamptz,
        last_pull_at      timestamptz,
        last_error        text,
        attempts          integer NOT NULL DEFAULT 0,
        retry_at          timestamptz,
        cursor            text,
        updated_at        timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX pull_tasks_owner ON pull_tasks (owner) WHERE owner IS NOT NULL;
    CREATE INDEX pull_tasks_partition ON pull_tasks (source_partition);
    CREATE TABLE lifecycle_outbox (
        id          bigserial PRIMARY KEY,
        config_id   text NOT NULL,
        event       jsonb NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    """,
    # Partition hand-over: the assigned instance claims the rows of a gained partition with
    # its consumer-group generation; a lease holder whose row is claimed by someone else
    # can neither renew nor take the lease. The instances table is for `status`.
    """
    ALTER TABLE pull_tasks ADD COLUMN claimed_by text, ADD COLUMN claimed_generation bigint;
    CREATE TABLE reconciler_instances (
        instance_id  text NOT NULL,
        boot_id      text PRIMARY KEY,
        started_at   timestamptz NOT NULL DEFAULT now(),
        last_seen    timestamptz NOT NULL DEFAULT now(),
        stopped_at   timestamptz,
        partitions   integer[] NOT NULL DEFAULT '{}',
        runs         integer NOT NULL DEFAULT 0
    );
    """,
    # How often the relay tried to send each event, committed before each try: a row tried
    # but still here may have reached Kafka, and is looked for there before it is sent again.
    """
    ALTER TABLE lifecycle_outbox ADD COLUMN attempt integer NOT NULL DEFAULT 0;
    """,
    # The consumer group's static member id of each process, if it has one: two live
    # processes with the same one take the member from each other for as long as both run.
    """
    ALTER TABLE reconciler_instances ADD COLUMN static_member_id text;
    """,
]

# Any constant works; it only has to be the same for every instance of the product.
_MIGRATION_LOCK = 0x70756C6C


class _PooledConnection(asyncpg.Connection):
    """A pooled connection that remembers whether it ever listened for notifications."""

    listened = False

    async def add_listener(self, channel, callback):
        self.listened = True
        await super().add_listener(channel, callback)


async def _reset_session(conn: _PooledConnection) -> None:
    """What a connection needs before it goes back to its pool.

    asyncpg's default reset costs a round trip on every release (advisory unlock, CLOSE ALL,
    UNLISTEN *, RESET ALL) for session state this product never leaves: its advisory locks
    and `SET LOCAL`s end with their transactions, it opens no cursors outside them and sets
    nothing for the session. asyncpg still rolls back an open transaction itself. The one
    exception is the lease-release listener: a connection that listened stops listening
    before anyone else gets it.
    """
    if conn.listened:
        await conn.execute("UNLISTEN *")
        conn.listened = False


@contextlib.asynccontextmanager
async def _bounded_transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A transaction PostgreSQL ends if its session idles in it past
    `IDLE_IN_TRANSACTION_SECONDS`."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('idle_in_transaction_session_timeout', $1, true)",
                           f"{int(IDLE_IN_TRANSACTION_SECONDS * 1000)}ms")
        yield


class Fenced(Exception):
    """A write for a run matched no row: its lease was taken over or the run was ended."""


@dataclass(frozen=True, slots=True)
class DesiredWrite:
    judgement: Judgement
    # The stored desired state changed in a way a reconcile must look at.
    changed: bool


@dataclass(frozen=True, slots=True)
class TaskRow:
    config_id: str
    enabled: bool
    deleted: bool
    config: Config | None
    config_version: int | None
    state: str
    run_id: str | None
    fence: int
    owner: str | None
    owner_boot: str | None
    lease_remaining: float | None
    backoff_remaining: float
    attempts: int
    cursor: str | None
    last_pull_at: dt.datetime | None
    source_partition: int | None
    # Seconds since the timestamp of the record the desired state came from.
    record_age: float | None = None

    @property
    def run_active(self) -> bool:
        return self.state in ACTIVE_STATES


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease just taken for a new run."""

    run_id: str
    fence: int
    config: Config
    cursor: str | None
    # Seconds until the first pull may happen by the contract's timing rule (before jitter).
    first_pull_delay: float
    lease_seconds: float


EventFactory = Callable[[int], dict]

# Desired-state writes in one transaction at most.
DESIRED_BATCH_LIMIT = 1000


@dataclass(slots=True)
class _PendingWrite:
    record: Config | Tombstone
    partition: int
    offset: int
    record_time: dt.datetime | None
    outcome: asyncio.Future


class Store:
    """Two connection pools: the runs' own writes (cursors, last pulls) go through
    `loop_pool`, everything else through `pool`, so a thousand loops waiting on the database
    never queue lease renewals, starts and stops behind them."""

    def __init__(self, pool: asyncpg.Pool, *, instance_id: str, boot_id: str, timeout: float,
                 loop_pool: asyncpg.Pool | None = None, static_member_id: str | None = None):
        self._pool = pool
        self._loop_pool = loop_pool or pool
        self._instance_id = instance_id
        self._boot_id = boot_id
        self._static_member_id = static_member_id
        self._timeout = timeout
        # Desired-state writes waiting for the writer task, in the order they were asked for.
        self._pending_writes: deque[_PendingWrite] = deque()
        self._writer: asyncio.Future | None = None

    @classmethod
    async def connect(
        cls, dsn: str, *, instance_id: str, boot_id: str, pool_size: int, timeout: float,
        static_member_id: str | None = None,
    ) -> "Store":
        options = dict(
            min_size=1, max_size=pool_size, command_timeout=timeout, timeout=timeout,
            connection_class=_PooledConnection, reset=_reset_session,
        )
        pool = await asyncpg.create_pool(dsn, **options)
        try:
            loop_pool = await asyncpg.create_pool(dsn, **options)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, instance_id=instance_id, boot_id=boot_id, timeout=timeout,
                   loop_pool=loop_pool, static_member_id=static_member_id)

    async def close(self) -> None:
        if self._loop_pool is not self._pool:
            await self._loop_pool.close()
        await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def loop_pool(self) -> asyncpg.Pool:
        return self._loop_pool

    async def migrate(self) -> None:
        """Bring the schema up to date; safe when several instances start at once."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            async with _bounded_transaction(conn):
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS reconciler_schema (version integer NOT NULL)"
                )
                current = await conn.fetchval("SELECT max(version) FROM reconciler_schema") or 0
                for number, sql in enumerate(MIGRATIONS[current:], start=current + 1):
                    await conn.execute(sql)
                    await conn.execute("INSERT INTO reconciler_schema VALUES ($1)", number)
                    log.info("schema migrated to version %d", number)

    # ---- desired state -------------------------------------------------------------------

    async def write_desired(
        self,
        record: Config | Tombstone,
        *,
        partition: int,
        offset: int,
        record_time: dt.datetime | None,
    ) -> DesiredWrite:
        """Store one accepted record as the config's desired state, by the version rules.

        Returns once the outcome is committed. Calls made together (the configs stream
        handles the records of different configs at once) are written together: one row
        lock over all of them, one statement per kind of write, one commit, in the order
        of the calls.
        """
        write = _PendingWrite(record, partition, offset, record_time,
                              asyncio.get_running_loop().create_future())
        self._pending_writes.append(write)
        if self._writer is None:
            # Runs after the calls already under way in this turn of the event loop.
            self._writer = asyncio.ensure_future(self._write_pending())
        return await write.outcome

    async def _write_pending(self) -> None:
        batch: list[_PendingWrite] = []
        try:
            while self._pending_writes:
                batch = self._next_batch()
                try:
                    outcomes = await self._write_desired_batch(batch)
                except Exception as error:
                    for write in batch:
                        if not write.outcome.done():
                            write.outcome.set_exception(error)
                    continue
                for write, outcome in zip(batch, outcomes):
                    if not write.outcome.done():
                        write.outcome.set_result(outcome)
        except BaseException:
            # Cancelled with the event loop or the store: nobody may wait forever.
            for write in [*batch, *self._pending_writes]:
                write.outcome.cancel()
            self._pending_writes.clear()
            raise
        finally:
            self._writer = None

    def _next_batch(self) -> list[_PendingWrite]:
        """The oldest waiting writes, up to the first that names a config again (a batch
        judges each config against its stored row once), callers that gave up left out."""
        batch: list[_PendingWrite] = []
        ids: set[str] = set()
        while self._pending_writes and len(batch) < DESIRED_BATCH_LIMIT:
            write = self._pending_writes[0]
            if write.record.id in ids:
                break
            self._pending_writes.popleft()
            if not write.outcome.done():
                batch.append(write)
                ids.add(write.record.id)
        return batch

    async def _write_desired_batch(self, batch: list[_PendingWrite]) -> list[DesiredWrite]:
        if not batch:
            return []
        async with self._pool.acquire(timeout=self._timeout) as conn:
            async with _bounded_transaction(conn):
                rows = await conn.fetch(
                    "SELECT config_id, config, config_version, deleted, enabled,"
                    " source_partition, source_offset FROM pull_tasks"
                    " WHERE config_id = ANY($1::text[]) ORDER BY config_id FOR UPDATE",
                    [write.record.id for write in batch],
                )
                stored = {row["config_id"]: row for row in rows}
                outcomes = []
                changes = _DesiredChanges()
                for write in batch:
                    outcomes.append(_judge_desired(stored.get(write.record.id), write, changes))
                await changes.write(conn)
                return outcomes

    # ---- reading -------------------------------------------------------------------------

    async def read(self, config_id: str) -> TaskRow | None:
        row = await self._pool.fetchrow(
            f"SELECT {_ROW_COLUMNS} FROM pull_tasks WHERE config_id = $1",
            config_id,
            timeout=self._timeout,
        )
        return None if row is None else _task_row(row)

    async def config_ids(
        self, *, partitions: list[int] | None = None, held_by_me: bool = False
    ) -> list[str]:
        """Configs of the given partitions, plus those whose lease names this instance."""
        rows = await self._pool.fetch(
            """
            SELECT config_id FROM pull_tasks
            WHERE ($1::int[] IS NULL OR source_partition = ANY($1::int[]))
               OR ($2 AND owner = $3)
            """,
            partitions,
            held_by_me,
            self._instance_id,
            timeout=self._timeout,
        )
        return [r["config_id"] for r in rows]

    async def status_rows(self) -> list[asyncpg.Record]:
        return await self._pool.fetch(
            """
            SELECT config_id, enabled, deleted, config_version, state, run_id, fence, owner,
                   lease_expires_at, started_at, stopped_at, last_pull_at, last_error,
                   attempts, retry_at, cursor, updated_at, config
            FROM pull_tasks ORDER BY config_id
            """,
            timeout=self._timeout,
        )

    # ---- leases and runs -----------------------------------------------------------------

    async def take_lease(
        self, config_id: str, *, run_id: str, lease_seconds: float, started_event: EventFactory
    ) -> Lease | None:
        """Take the config's lease for a new run, raising the fencing number.

        None when the lease is held by another live run, or the desired state no longer
        asks for a run. The `started` event is built from the new fencing number and
        written in the same transaction.
        """
        # One statement, so one round trip and one commit: the lease and its `started`
        # event (whose fencing number the statement fills in) are written together.
        event = started_event(0)
        row = await self._pool.fetchrow(
            """
            WITH taken AS (
                UPDATE pull_tasks SET
                    state = 'running', run_id = $2, fence = fence + 1,
                    owner = $3, owner_boot = $4,
                    lease_expires_at = now() + make_interval(secs => $5),
                    started_at = now(), stopped_at = NULL, retry_at = NULL,
                    updated_at = now()
                WHERE config_id = $1 AND enabled AND NOT deleted
                  AND state NOT IN ('starting', 'running', 'stopping')
                  AND (owner IS NULL OR lease_expires_at <= now()
                       OR (owner = $3 AND owner_boot = $4))
                  AND (claimed_by IS NULL OR claimed_by = $3)
                RETURNING config_id, fence, config, config_version, cursor,
                    EXTRACT(EPOCH FROM (now() - last_pull_at)) AS since_last_pull
            ), started AS (
                -- The version is the one this statement found: a newer one stored after
                -- the caller read the row is the one the run runs, and the event says so.
                INSERT INTO lifecycle_outbox (config_id, event)
                SELECT config_id, jsonb_set(
                    jsonb_set($6::jsonb, '{data,fence}', to_jsonb(fence)),
                    '{data,config_version}', COALESCE(to_jsonb(config_version), 'null'::jsonb))
                FROM taken
            )
            SELECT fence, config, cursor, since_last_pull FROM taken
            """,
            config_id,
            run_id,
            self._instance_id,
            self._boot_id,
            lease_seconds,
            json.dumps(event),
            timeout=self._timeout,
        )
        if row is None:
            return None
        config = config_from_json_dict(json.loads(row["config"]), expected_id=config_id)
        since = row["since_last_pull"]
        wait = 0.0 if since is None else max(0.0, config.interval_seconds - float(since))
        return Lease(
            run_id=run_id,
            fence=row["fence"],
            config=config,
            cursor=row["cursor"],
            first_pull_delay=wait,
            lease_seconds=lease_seconds,
        )

    async def renew_leases(
        self, runs: list[tuple[str, str, int]], *, lease_seconds: float
    ) -> set[str]:
        """Renew this instance's leases in one statement; returns the renewed config ids.

        `runs` holds (config id, run id, fencing number). A lease is renewed only while the
        row is still this run's and no other instance has claimed the config's partition:
        an instance cut off from Kafka cannot keep a config its successor wants. A change
        of the desired state (disabled, deleted, a new version) does not end the lease:
        the reconcile the change queued stops the run and says why. (Refusing the renewal
        as well made runs whose reconcile waited behind a burst of changes stop as
        `lease-lost` instead of `disabled`.)
        """
        if not runs:
            return set()
        ids, run_ids, fences = (list(column) for column in zip(*runs))
        # Rows are locked in config id order, as every other statement that locks many
        # (the configs stream's batched writes) does: locked in the join's order, a
        # renewal and a batch deadlocked, and a renewal chosen as the victim cost its runs
        # their leases.
        rows = await self._pool.fetch(
            """
            WITH renewable AS (
                SELECT t.config_id FROM pull_tasks t
                JOIN unnest($1::text[], $2::text[], $3::bigint[]) AS r(config_id, run_id, fence)
                  ON t.config_id = r.config_id
                WHERE t.run_id = r.run_id AND t.fence = r.fence
                  AND t.owner = $4 AND t.owner_boot = $5
                  AND t.state IN ('starting', 'running', 'stopping')
                  AND (t.claimed_by IS NULL OR t.claimed_by = $4)
                ORDER BY t.config_id
                FOR UPDATE OF t
            )
            UPDATE pull_tasks t SET lease_expires_at = now() + make_interval(secs => $6)
            FROM renewable WHERE t.config_id = renewable.config_id
            RETURNING t.config_id
            """,
            ids,
            run_ids,
            fences,
            self._instance_id,
            self._boot_id,
            lease_seconds,
            timeout=self._timeout,
        )
        return {r["config_id"] for r in rows}

    async def claim_partitions(self, partitions: list[int], *, generation: int) -> None:
        """Mark the rows of newly assigned partitions as this instance's to run (locked in
        config id order, as every statement that locks many rows)."""
        await self._pool.execute(
            """
            WITH claimed AS (
                SELECT config_id FROM pull_tasks
                WHERE source_partition = ANY($1::int[])
                  AND (claimed_generation IS NULL OR claimed_generation <= $3)
                  AND claimed_by IS DISTINCT FROM $2
                ORDER BY config_id
                FOR UPDATE
            )
            UPDATE pull_tasks t SET claimed_by = $2, claimed_generation = $3
            FROM claimed WHERE t.config_id = claimed.config_id
            """,
            partitions,
            self._instance_id,
            generation,
            timeout=self._timeout,
        )

    async def heartbeat(self, *, partitions: list[int], runs: int, stopped: bool = False) -> None:
        await self._pool.execute(
            """
            INSERT INTO reconciler_instances (instance_id, boot_id, partitions, runs,
                                              static_member_id)
            VALUES ($1, $2, $3, $4, $6)
            ON CONFLICT (boot_id) DO UPDATE SET last_seen = now(), partitions = $3, runs = $4,
                stopped_at = CASE WHEN $5 THEN now() END
            """,
            self._instance_id,
            self._boot_id,
            partitions,
            runs,
            stopped,
            self._static_member_id,
            timeout=self._timeout,
        )

    async def newer_process_with_our_member_id(self, *, seen_within: float) -> str | None:
        """The instance id of a live process that started after this one with the same
        static member id, if there is one (seen within `seen_within` seconds)."""
        if self._static_member_id is None:
            return None
        return await self._pool.fetchval(
            """
            SELECT other.instance_id FROM reconciler_instances other
            JOIN reconciler_instances us ON us.boot_id = $2
            WHERE other.static_member_id = $1 AND other.boot_id <> $2
              AND other.stopped_at IS NULL
              AND other.last_seen > now() - make_interval(secs => $3)
              AND (other.started_at, other.boot_id) > (us.started_at, us.boot_id)
            ORDER BY other.started_at LIMIT 1
            """,
            self._static_member_id,
            self._boot_id,
            seen_within,
            timeout=self._timeout,
        )

    async def mark_stopping(self, config_id: str, *, run_id: str, fence: int) -> None:
        await self._pool.execute(
            "UPDATE pull_tasks SET state = 'stopping', updated_at = now()"
            " WHERE config_id = $1 AND run_id = $2 AND fence = $3 AND state = 'running'",
            config_id,
            run_id,
            fence,
            timeout=self._timeout,
        )

    async def stop_runs(self, runs: list[tuple[str, str, int, dict]]) -> set[str]:
        """Record the ends of runs of ours that stopped (not failed), each once, with its
        event, and give up their leases; returns the config ids whose run was still open.

        `runs` holds (config id, run id, fencing number, `stopped` event). One statement,
        so one round trip and one commit for all: each end, its event and its release are
        written together, the event ahead of any successor's `started` in the outbox (the
        relay sends in outbox order). The row's desired state now, not the one that made
        the run stop, says what the config is: a tombstone followed by a new record leaves
        it `stopped`, not `deleted`. Rows are locked in config id order, as every
        statement that locks many.
        """
        if not runs:
            return set()
        ids, run_ids, fences, events = zip(*runs)
        rows = await self._pool.fetch(
            """
            WITH open AS (
                SELECT t.config_id, r.event FROM pull_tasks t
                JOIN unnest($1::text[], $2::text[], $3::bigint[], $4::text[])
                    AS r(config_id, run_id, fence, event)
                  ON t.config_id = r.config_id
                WHERE t.run_id = r.run_id AND t.fence = r.fence
                  AND t.state IN ('starting', 'running', 'stopping')
                ORDER BY t.config_id
                FOR UPDATE OF t
            ), ended AS (
                UPDATE pull_tasks t SET
                    state = CASE WHEN t.deleted THEN 'deleted' ELSE 'stopped' END,
                    stopped_at = now(), last_error = NULL, retry_at = NULL,
                    owner = CASE WHEN t.owner = $5 AND t.owner_boot = $6 THEN NULL
                                 ELSE t.owner END,
                    owner_boot = CASE WHEN t.owner = $5 AND t.owner_boot = $6 THEN NULL
                                      ELSE t.owner_boot END,
                    lease_expires_at = CASE WHEN t.owner = $5 AND t.owner_boot = $6 THEN NULL
                                            ELSE t.lease_expires_at END,
                    updated_at = now()
                FROM open WHERE t.config_id = open.config_id
                RETURNING t.config_id, open.event, t.owner IS NULL AS released
            ), recorded AS (
                INSERT INTO lifecycle_outbox (config_id, event)
                SELECT config_id, event::jsonb FROM ended ORDER BY config_id
                RETURNING config_id
            ), notified AS (
                -- Sent when the transaction commits, for the leases that were ours.
                SELECT pg_notify($7, config_id) FROM ended WHERE released
            )
            SELECT config_id FROM recorded, (SELECT count(*) FROM notified) AS n
            """,
            list(ids),
            list(run_ids),
            list(fences),
            [json.dumps(event) for event in events],
            self._instance_id,
            self._boot_id,
            LEASE_CHANNEL,
            timeout=self._timeout,
        )
        ended = {row["config_id"] for row in rows}
        # Already ended (by this instance before, or in the record by a successor): a lease
        # such a run still holds is given up all the same.
        for config_id, run_id, fence, _ in runs:
            if config_id not in ended:
                async with self._pool.acquire(timeout=self._timeout) as conn:
                    await self._release(conn, config_id, run_id=run_id, fence=fence)
        return ended

    async def fail_run(
        self,
        config_id: str,
        *,
        run_id: str,
        fence: int,
        error: str,
        retry_in: Callable[[int], float],
        end_event: Callable[[int], dict],
    ) -> bool:
        """Record the failure of one of our runs, once, and give up its lease; False if the
        run was already ended.

        `retry_in(attempt)` gives the backoff delay; the attempt count is the row's, raised
        by one. `end_event(attempt)` builds the `failed` event. The end, its event and the
        release commit together: the event is in the outbox ahead of any successor's
        `started`, and the relay sends in outbox order.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn:
            async with _bounded_transaction(conn):
                ended = await self._record_failure(
                    conn, config_id, run_id=run_id, fence=fence, end_event=end_event,
                    error=error, retry_in=retry_in,
                )
                await self._release(conn, config_id, run_id=run_id, fence=fence)
                return ended

    async def _record_failure(
        self,
        conn: asyncpg.Connection,
        config_id: str,
        *,
        run_id: str,
        fence: int,
        end_event: Callable[[int], dict],
        error: str,
        retry_in: Callable[[int], float],
    ) -> bool:
        row = await conn.fetchrow(
            "SELECT attempts, enabled, deleted FROM pull_tasks WHERE config_id = $1"
            " AND run_id = $2 AND fence = $3 AND state IN ('starting', 'running', 'stopping')"
            " FOR UPDATE",
            config_id,
            run_id,
            fence,
        )
        if row is None:
            return False
        attempt = row["attempts"] + 1
        delay = retry_in(attempt)
        # A failed run of a config that was disabled or deleted meanwhile is not retried:
        # its row says `failed`.
        state = "backoff" if row["enabled"] and not row["deleted"] else "failed"
        await conn.execute(
            """
            UPDATE pull_tasks SET state = $2, stopped_at = now(), last_error = $3,
                attempts = $4, retry_at = now() + make_interval(secs => $5),
                updated_at = now()
            WHERE config_id = $1
            """,
            config_id,
            state,
            error,
            attempt,
            delay,
        )
        await self._insert_event(conn, config_id, end_event(attempt))
        return True

    async def end_expired_run(
        self, config_id: str, *, end_event: Callable[[str, str | None, int, int | None], dict]
    ) -> bool:
        """End, in the record, a run whose lease expired (its holder vanished or froze).

        `end_event(run_id, owner, fence, config_version)` builds the `stopped` event.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn:
            async with _bounded_transaction(conn):
                row = await conn.fetchrow(
                    """
                    SELECT run_id, owner, fence, config_version FROM pull_tasks
                    WHERE config_id = $1 AND state IN ('starting', 'running', 'stopping')
                      AND (lease_expires_at IS NULL OR lease_expires_at <= now())
                    FOR UPDATE
                    """,
                    config_id,
                )
                if row is None:
                    return False
                await conn.execute(
                    """
                    UPDATE pull_tasks SET
                        state = CASE WHEN deleted THEN 'deleted' ELSE 'stopped' END,
                        stopped_at = now(), owner = NULL, owner_boot = NULL,
                        lease_expires_at = NULL, updated_at = now()
                    WHERE config_id = $1
                    """,
                    config_id,
                )
                event = end_event(
                    row["run_id"], row["owner"], row["fence"], row["config_version"]
                )
                await self._insert_event(conn, config_id, event)
                return True

    async def release_lease(self, config_id: str, *, run_id: str, fence: int) -> None:
        """Give up an ended run's lease and wake whoever waits for it."""
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await self._release(conn, config_id, run_id=run_id, fence=fence)

    async def _release(
        self, conn: asyncpg.Connection, config_id: str, *, run_id: str, fence: int
    ) -> None:
        # The notification goes out when the transaction commits, if the lease was ours.
        await conn.execute(
            """
            WITH released AS (
                UPDATE pull_tasks SET owner = NULL, owner_boot = NULL,
                    lease_expires_at = NULL,
                    state = CASE WHEN deleted THEN 'deleted' ELSE state END,
                    updated_at = now()
                WHERE config_id = $1 AND run_id = $2 AND fence = $3 AND owner = $4
                  AND owner_boot = $5
                  AND state NOT IN ('starting', 'running', 'stopping')
                RETURNING config_id
            )
            SELECT pg_notify($6, config_id) FROM released
            """,
            config_id,
            run_id,
            fence,
            self._instance_id,
            self._boot_id,
            LEASE_CHANNEL,
        )

    async def save_cursor(
        self, config_id: str, *, run_id: str, fence: int, source: Config, cursor: str
    ) -> None:
        """Save a page's cursor, unless the desired state moved to another source meanwhile.

        A cursor belongs to a source (`url`, `channel_id`, `product_id`): when a change of
        those has cleared the saved cursor, a run still on the old source must not write
        its cursor back; its restart follows.
        """
        await self._fenced_update(
            f"cursor = CASE WHEN {_SAME_SOURCE} THEN $4 ELSE cursor END",
            config_id, run_id, fence, cursor, source,
        )

    async def record_successful_pull(
        self, config_id: str, *, run_id: str, fence: int, source: Config, seconds_ago: float
    ) -> None:
        """The pull that began `seconds_ago` ended well: it is the new last pull."""
        await self._fenced_update(
            f"last_pull_at = CASE WHEN {_SAME_SOURCE}"
            " THEN now() - make_interval(secs => $4) ELSE last_pull_at END,"
            " attempts = 0, retry_at = NULL, last_error = NULL",
            config_id, run_id, fence, seconds_ago, source,
        )

    async def _fenced_update(
        self, assignments: str, config_id: str, run_id: str, fence: int, value: Any,
        source: Config,
    ) -> None:
        url, channel_id, product_id = _source_identity(source)
        done = await self._loop_pool.fetchval(
            f"""
            UPDATE pull_tasks SET {assignments}, updated_at = now()
            WHERE config_id = $1 AND run_id = $2 AND fence = $3 AND owner = $5
              AND owner_boot = $6 AND state IN ('starting', 'running', 'stopping')
            RETURNING true
            """,
            config_id,
            run_id,
            fence,
            value,
            self._instance_id,
            self._boot_id,
            url,
            channel_id,
            product_id,
            timeout=self._timeout,
        )
        if not done:
            raise Fenced(f"run {run_id} of {config_id} no longer holds fencing number {fence}")

    # ---- outbox --------------------------------------------------------------------------

    async def _insert_event(self, conn: asyncpg.Connection, config_id: str, event: dict) -> None:
        await conn.execute(
            "INSERT INTO lifecycle_outbox (config_id, event) VALUES ($1, $2::jsonb)",
            config_id,
            json.dumps(event),
        )

    async def mark_outbox_attempted(self, ids: list[int]) -> None:
        await self._pool.execute(
            "UPDATE lifecycle_outbox SET attempt = attempt + 1 WHERE id = ANY($1::bigint[])",
            ids,
            timeout=self._timeout,
        )

    async def enabled_not_running(self, *, longer_than: float) -> int:
        """Enabled configs with no run and no backoff, unchanged for `longer_than` seconds."""
        return await self._pool.fetchval(
            """
            SELECT count(*) FROM pull_tasks
            WHERE enabled AND NOT deleted AND state NOT IN ('running', 'backoff')
              AND updated_at < now() - make_interval(secs => $1)
            """,
            longer_than,
            timeout=self._timeout,
        )

    async def outbox_depth(self) -> int:
        return await self._pool.fetchval(
            "SELECT count(*) FROM lifecycle_outbox", timeout=self._timeout
        )


def _judge_desired(
    row: asyncpg.Record | None, write: _PendingWrite, changes: _DesiredChanges
) -> DesiredWrite:
    """Judge one record against the config's stored row (locked) and note its write."""
    record, partition, offset = write.record, write.partition, write.offset
    if (
        row is not None
        and row["source_partition"] == partition
        and row["source_offset"] is not None
        and row["source_offset"] >= offset
    ):
        return DesiredWrite(
            Judgement(Verdict.IGNORE, f"offset {offset} was already applied"), False
        )
    stored = _stored_desired(row)
    if isinstance(record, Tombstone):
        judgement = judge_tombstone(stored=stored)
    else:
        judgement = judge_config(stored=stored, version=record.version,
                                 normalised=record.normalised())
    if judgement.verdict is not Verdict.APPLY:
        return DesiredWrite(judgement, False)

    if isinstance(record, Tombstone):
        changes.tombstones.append(write)
        return DesiredWrite(judgement, row is not None)
    previous = _config_of(row) if row is not None and not row["deleted"] else None
    same_content = previous is not None and previous.normalised() == record.normalised()
    same_source = previous is not None and _source_identity(previous) == _source_identity(record)
    changes.configs.append((write, row is not None, same_source, same_content))
    return DesiredWrite(judgement, not same_content)


@dataclass(slots=True)
class _DesiredChanges:
    """The applied records of one batch, written with one statement per kind."""

    # (write, the row exists, same source as stored, same normalised content as stored)
    configs: list[tuple[_PendingWrite, bool, bool, bool]] = field(default_factory=list)
    tombstones: list[_PendingWrite] = field(default_factory=list)

    async def write(self, conn: asyncpg.Connection) -> None:
        updates = [change for change in self.configs if change[1]]
        inserts = [change for change in self.configs if not change[1]]
        if updates:
            await conn.execute(_UPDATE_CONFIGS, *_config_columns(updates))
        if inserts:
            await conn.execute(_INSERT_CONFIGS, *_config_columns(inserts)[:7])
        if self.tombstones:
            await conn.execute(
                _WRITE_TOMBSTONES,
                [write.record.id for write in self.tombstones],
                [write.partition for write in self.tombstones],
                [write.offset for write in self.tombstones],
                [write.record_time for write in self.tombstones],
            )


def _config_columns(changes: list[tuple[_PendingWrite, bool, bool, bool]]) -> list[list]:
    configs = [write.record for write, *_ in changes]
    return [
        [config.id for config in configs],
        [config.enabled for config in configs],
        [json.dumps(config.to_json_dict()) for config in configs],
        [config.version for config in configs],
        [write.partition for write, *_ in changes],
        [write.offset for write, *_ in changes],
        [write.record_time for write, *_ in changes],
        [same_source for _, _, same_source, _ in changes],
        [same_content for *_, same_content in changes],
    ]


_DESIRED_COLUMNS = """
    unnest($1::text[], $2::boolean[], $3::text[], $4::bigint[], $5::integer[], $6::bigint[],
           $7::timestamptz[])
    AS w(config_id, enabled, config, config_version, source_partition, source_offset,
         record_time)
"""

# Rows that exist, locked by the batch: a change of source clears the cursor and the last
# pull, a change of content resets the attempts and the backoff; a run keeps its state.
_UPDATE_CONFIGS = """
    UPDATE pull_tasks t SET
        enabled = w.enabled,
        config = w.config::jsonb,
        config_version = w.config_version,
        deleted = false,
        source_partition = w.source_partition,
        source_offset = w.source_offset,
        record_time = w.record_time,
        cursor = CASE WHEN w.same_source THEN t.cursor END,
        last_pull_at = CASE WHEN w.same_source THEN t.last_pull_at END,
        retry_at = CASE WHEN w.same_content THEN t.retry_at END,
        attempts = CASE WHEN w.same_content THEN t.attempts ELSE 0 END,
        state = CASE WHEN t.state IN ('starting', 'running', 'stopping') THEN t.state
                     WHEN w.enabled AND t.state = 'backoff' AND w.same_content THEN 'backoff'
                     ELSE 'stopped' END,
        updated_at = now()
    FROM unnest($1::text[], $2::boolean[], $3::text[], $4::bigint[], $5::integer[],
                $6::bigint[], $7::timestamptz[], $8::boolean[], $9::boolean[])
        AS w(config_id, enabled, config, config_version, source_partition, source_offset,
             record_time, same_source, same_content)
    WHERE t.config_id = w.config_id
"""

# New configs; one that another instance inserted meanwhile is treated as new content.
_INSERT_CONFIGS = """
    INSERT INTO pull_tasks (config_id, enabled, config, config_version, deleted,
                            source_partition, source_offset, record_time)
    SELECT w.config_id, w.enabled, w.config::jsonb, w.config_version, false,
           w.source_partition, w.source_offset, w.record_time
    FROM """ + _DESIRED_COLUMNS + """
    ON CONFLICT (config_id) DO UPDATE SET
        enabled = excluded.enabled,
        config = excluded.config,
        config_version = excluded.config_version,
        deleted = false,
        source_partition = excluded.source_partition,
        source_offset = excluded.source_offset,
        record_time = excluded.record_time,
        cursor = NULL, last_pull_at = NULL, retry_at = NULL, attempts = 0,
        state = CASE WHEN pull_tasks.state IN ('starting', 'running', 'stopping')
                     THEN pull_tasks.state ELSE 'stopped' END,
        updated_at = now()
"""

# The version stays: a later record at or below it must not bring the config back.
_WRITE_TOMBSTONES = """
    INSERT INTO pull_tasks (config_id, enabled, deleted, state, source_partition,
                            source_offset, record_time)
    SELECT w.config_id, false, true, 'deleted', w.source_partition, w.source_offset,
           w.record_time
    FROM unnest($1::text[], $2::integer[], $3::bigint[], $4::timestamptz[])
        AS w(config_id, source_partition, source_offset, record_time)
    ON CONFLICT (config_id) DO UPDATE SET
        enabled = false, deleted = true, cursor = NULL, last_pull_at = NULL,
        retry_at = NULL, attempts = 0,
        state = CASE WHEN pull_tasks.state IN ('starting', 'running', 'stopping')
                     THEN pull_tasks.state ELSE 'deleted' END,
        source_partition = excluded.source_partition,
        source_offset = excluded.source_offset,
        record_time = excluded.record_time,
        updated_at = now()
"""


# The desired state still names the source a run pulls from ($7 url, $8 channel, $9 product).
_SAME_SOURCE = (
    "(NOT deleted AND config->'source'->>'url' = $7 AND config->>'channel_id' = $8"
    " AND config->>'product_id' = $9)"
)

_ROW_COLUMNS = """
    config_id, enabled, deleted, config, config_version, state, run_id, fence, owner,
    owner_boot, source_partition, attempts, cursor, last_pull_at,
    EXTRACT(EPOCH FROM (lease_expires_at - now())) AS lease_remaining,
    EXTRACT(EPOCH FROM (now() - record_time))::float8 AS record_age,
    GREATEST(0, COALESCE(EXTRACT(EPOCH FROM (retry_at - now())), 0)) AS backoff_remaining
"""


def _task_row(row: asyncpg.Record) -> TaskRow:
    return TaskRow(
        config_id=row["config_id"],
        enabled=row["enabled"],
        deleted=row["deleted"],
        config=_config_of(row),
        config_version=row["config_version"],
        state=row["state"],
        run_id=row["run_id"],
        fence=row["fence"],
        owner=row["owner"],
        owner_boot=row["owner_boot"],
        lease_remaining=None if row["lease_remaining"] is None else float(row["lease_remaining"]),
        backoff_remaining=float(row["backoff_remaining"]),
        attempts=row["attempts"],
        cursor=row["cursor"],
        last_pull_at=row["last_pull_at"],
        source_partition=row["source_partition"],
        record_age=row["record_age"],
    )


def _config_of(row: asyncpg.Record) -> Config | None:
    if row["config"] is None:
        return None
    return config_from_json_dict(json.loads(row["config"]))


def _stored_desired(row: asyncpg.Record | None) -> StoredDesired | None:
    if row is None:
        return None
    config = None if row["deleted"] else _config_of(row)
    return StoredDesired(
        version=row["config_version"],
        deleted=row["deleted"],
        normalised=None if config is None else config.normalised(),
    )


def _source_identity(config: Config) -> tuple[str, str, str]:
    return (config.source.url, config.channel_id, config.product_id)
