"""Records sent in Kafka transactions under one transactional id: the broker's fence.

A deadline checked in this process cannot stop bytes that already left it: a produce
request written just before a run's lease deadline can sit in a socket buffer of a frozen
process, a frozen broker or a network path that holds packets, and be appended long after,
when a successor already runs. Kafka fences such zombies itself: every producer started
with a transactional id bumps that id's epoch, aborts the transaction the previous holder
left open and rejects every later request of the previous holder. Consumers that read
committed records (`isolation_level="read_committed"`) never see the aborted ones.

One `TransactionalSender` serves one fencing scope (one configs partition's orders, or the
deployment's lifecycle events). Sends that arrive while a transaction is under way wait and
go together in the next one, so a scope with many runs pays one commit per round, not per
send. The producer is started lazily, only for a send whose deadline has not passed, and
started again after it was fenced: the scope's legitimate holder takes it back, while a
process whose deadline passed (the zombie) never starts one and finds its old producer
fenced. A scope can also be given up (`may_start` says no, for example for a partition
this instance no longer owns): its sends then fail with `NotHeld` rather than take the id
back from its new holder. A transaction whose commit is not acknowledged by the earliest deadline among its
sends is abandoned with its producer; the next producer's start aborts it, if the broker
had not committed it meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    MessageSizeTooLargeError,
    ProducerFenced,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from streams.connection import KafkaConnection
from streams.publisher import Deadline, Expired, OutgoingRecord

log = logging.getLogger(__name__)

# After a failed transaction (fenced by a peer, the broker away) the sends with time left
# go again after a pause growing from the first to the last of these.
_RETRY_PAUSE = (0.05, 1.0)
# Errors no retry cures: the send fails with them at once.
_FINAL = (TransactionalIdAuthorizationFailed, TopicAuthorizationFailedError,
          ClusterAuthorizationFailedError)
_MAX_REQUEST_BYTES = 4 * 1024 * 1024
# What a record costs in a batch beyond its key, value and headers; generous.
_RECORD_OVERHEAD = 128


class NotHeld(Exception):
    """This process may no longer hold the scope, and its producer was fenced or is gone."""


@dataclass(eq=False)
class _Send:
    topic: str
    records: list[OutgoingRecord]
    deadline: Deadline
    done: asyncio.Future

    def expired(self, now: float) -> bool:
        return self.deadline() <= now


class TransactionalSender:
    def __init__(self, connection: KafkaConnection, transactional_id: str, *,
                 transaction_timeout: float, request_timeout: float = 30.0,
                 may_start: Callable[[], bool] = lambda: True) -> None:
        self._connection = connection
        self._may_start = may_start
        self.transactional_id = transactional_id
        self._transaction_timeout = transaction_timeout
        self._request_timeout = request_timeout
        self._producer: AIOKafkaProducer | None = None
        self._waiting: list[_Send] = []
        self._flusher: asyncio.Task | None = None
        self._closed = False
        self._stopping: set[asyncio.Task] = set()
        self._failing = False
        self._renew = False
        # How many producers this scope started: each start fenced the one before.
        self.starts = 0
        self.transactions = 0

    async def send_all(self, topic: str, records: list[OutgoingRecord], *,
                       deadline: Deadline) -> None:
        """Send the records in one transaction (shared with other sends of this scope) and
        return once it is committed. Raises `Expired` if the deadline passes first: then
        none of them becomes visible to a read-committed consumer after a later holder of
        the scope started, and none is written by a producer started after the deadline.

        With no records it only makes sure this process holds the scope: its producer is
        started, so every earlier holder is fenced, before the caller acts."""
        if self._closed:
            raise Expired(f"{self.transactional_id} is closed")
        oversized = _oversized(records)
        if oversized is not None:
            raise MessageSizeTooLargeError(oversized)
        send = _Send(topic, records, deadline, asyncio.get_running_loop().create_future())
        self._waiting.append(send)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name=self.transactional_id)
        await asyncio.shield(send.done)

    async def hold_anew(self, *, deadline: Deadline) -> None:
        """Start a new producer for the scope even if this process holds one. When this
        returns, every transaction of an earlier holder is committed or aborted, its
        markers written: a read-committed consumer's end offsets are final for them."""
        self._renew = True
        await self.send_all("", [], deadline=deadline)

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.wait({self._flusher})
        for send in self._waiting:
            _settle(send, Expired(f"{self.transactional_id} was closed"))
        self._waiting.clear()
        self._drop_producer()
        if self._stopping:
            await asyncio.wait(set(self._stopping), timeout=5)

    # ---- the flusher ---------------------------------------------------------------------

    async def _flush(self) -> None:
        pause = _RETRY_PAUSE[0]
        try:
            while self._waiting:
                now = time.monotonic()
                sends, self._waiting = self._waiting, []
                live = []
                for send in sends:
                    if send.done.done():
                        continue
                    if send.expired(now):
                        _settle(send, Expired("the deadline passed before the records were "
                                              "sent"))
                    else:
                        live.append(send)
                if live and not await self._transact(live):
                    await asyncio.sleep(pause)
                    pause = min(_RETRY_PAUSE[1], pause * 2)
                else:
                    pause = _RETRY_PAUSE[0]
        except asyncio.CancelledError:
            for send in self._waiting:
                _settle(send, Expired(f"{self.transactional_id} was closed"))
            raise

    async def _transact(self, sends: list[_Send]) -> bool:
        """Send these in one transaction; False when it failed and sends with time left
        went back to the queue for the next round."""
        until = min(send.deadline() for send in sends)
        if self._renew:
            self._renew = False
            self._drop_producer()
        try:
            producer = await self._started_producer(until)
            if not any(send.records for send in sends):
                for send in sends:
                    _settle(send, None)
                return True
            await _within(until, producer.begin_transaction())

            written: list[asyncio.Future] = []

            async def append_all() -> None:
                # Appending waits while a partition's batch is full, until the producer's
                # sender drained it: with the sender stuck (its coordinator loading after a
                # broker restart, or fenced) that is aiokafka's 30 s per record, not ours.
                for send in sends:
                    for record in send.records:
                        future = await producer.send(send.topic, value=record.value,
                                                     key=record.key,
                                                     headers=record.headers or None)
                        future.add_done_callback(_retrieved)
                        written.append(future)

            await _within(until, append_all())
            # Every record's own outcome first: aiokafka would commit a transaction with a
            # record the broker refused, without it.
            await _within(until, asyncio.wait(written))
            refused = next((f.exception() for f in written if f.exception() is not None), None)
            now = time.monotonic()
            if refused is not None or any(send.expired(now) for send in sends):
                # Nothing of the transaction is visible yet: abort it, and let those with
                # time left go again.
                await _within(until, producer.abort_transaction())
                if refused is not None:
                    raise refused
                self._retry(sends, Expired("the deadline passed before the transaction was "
                                           "committed"))
                return True
            await _within(until, producer.commit_transaction())
        except (MessageSizeTooLargeError, RecordTooLargeError) as error:
            self._drop_producer()
            if len(sends) == 1:
                _settle(sends[0], error)
            else:
                # One of them is too large for the broker: each goes alone, so only that
                # one fails.
                for send in sends:
                    await self._transact([send])
            return True
        except (NotHeld, *_FINAL) as error:
            self._drop_producer()
            for send in sends:
                _settle(send, error)
            return True
        except Exception as error:
            if isinstance(error, ProducerFenced) or _fenced(self._producer):
                # Another process started a producer with this id: for the events' id that
                # is every other relay taking its turn; this one takes the id back.
                log.debug("%s was taken by another producer; sending with a new one",
                          self.transactional_id)
            else:
                quiet = isinstance(error, TimeoutError) or self._failing
                log.log(logging.DEBUG if quiet else logging.WARNING,
                        "transaction of %s failed (%s); trying again with a new producer "
                        "while the sends' deadlines last", self.transactional_id,
                        " ".join(str(error).split()) or type(error).__name__)
            self._failing = True
            self._drop_producer()
            self._retry(sends, error if not isinstance(error, TimeoutError) else
                        Expired("the deadline passed before Kafka committed the transaction"))
            return False
        self.transactions += 1
        self._failing = False
        for send in sends:
            _settle(send, None)
        return True

    def _retry(self, sends: list[_Send], error: BaseException) -> None:
        now = time.monotonic()
        for send in sends:
            if send.expired(now):
                _settle(send, error if isinstance(error, Expired) else
                        Expired(f"the deadline passed; the last attempt failed: {error}"))
            else:
                self._waiting.append(send)

    async def _started_producer(self, until: float) -> AIOKafkaProducer:
        """This scope's producer; a new one is started (fencing every earlier holder of the
        transactional id) only for sends whose deadline has not passed."""
        if self._producer is not None:
            return self._producer
        if not self._may_start():
            raise NotHeld(f"{self.transactional_id} is no longer this instance's to hold")
        producer = AIOKafkaProducer(
            **self._connection.client_options(),
            transactional_id=self.transactional_id,
            transaction_timeout_ms=max(1000, int(self._transaction_timeout * 1000)),
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            request_timeout_ms=int(self._request_timeout * 1000),
            max_request_size=_MAX_REQUEST_BYTES,
        )
        try:
            await _within(until, producer.start())
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)
            raise
        self.starts += 1
        self._producer = producer
        return producer

    def _drop_producer(self) -> None:
        """Forget the producer and stop it in the background: the next one's start aborts
        whatever transaction it left open."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        task = asyncio.create_task(_stop_quietly(producer))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)


class TransactionalSenders:
    """One `TransactionalSender` per scope, made on first use: `<base>.<scope>` is its
    transactional id, the same in every process of the deployment."""

    def __init__(self, connection: KafkaConnection, base_id: str, *,
                 transaction_timeout: float,
                 may_hold: Callable[[str], bool] = lambda scope: True) -> None:
        self._connection = connection
        self._base_id = base_id
        self._may_hold = may_hold
        self._transaction_timeout = transaction_timeout
        self._senders: dict[str, TransactionalSender] = {}

    def __getitem__(self, scope: str) -> TransactionalSender:
        sender = self._senders.get(scope)
        if sender is None:
            sender = self._senders[scope] = TransactionalSender(
                self._connection, f"{self._base_id}.{scope}",
                transaction_timeout=self._transaction_timeout,
                may_start=lambda: self._may_hold(scope),
            )
        return sender

    async def send_all(self, scope: str, topic: str, records: list[OutgoingRecord], *,
                       deadline: Deadline) -> None:
        """`TransactionalSender.send_all` of the scope's sender."""
        await self[scope].send_all(topic, records, deadline=deadline)

    async def close(self) -> None:
        senders, self._senders = list(self._senders.values()), {}
        await asyncio.gather(*(sender.close() for sender in senders))


def _fenced(producer: AIOKafkaProducer | None) -> bool:
    """Whether the broker fenced this producer (its transactions can never go on)."""
    manager = getattr(producer, "_txn_manager", None)
    return manager is not None and manager.is_fatal_error()


def quiet_fenced_producers(loop: asyncio.AbstractEventLoop) -> None:
    """A fenced producer's sender fails futures nobody waits for any more, and asyncio
    reports each with a traceback as never retrieved. Fencing is how a scope changes
    hands, acted on where it happens: report those at debug level, everything else as
    before."""
    if getattr(loop, "_quiet_fenced_producers", False):
        return
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if isinstance(context.get("exception"), ProducerFenced):
            log.debug("a fenced producer's request failed: %s", context.get("message"))
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handle)
    loop._quiet_fenced_producers = True  # type: ignore[attr-defined]


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(producer.stop(), 5)
    # A fenced producer's sender task ends with `ProducerFenced`, which aiokafka leaves
    # for asyncio to report as never retrieved; this sender already acted on it.
    sender_task = getattr(getattr(producer, "_sender", None), "_sender_task", None)
    if sender_task is not None and sender_task.done():
        _retrieved(sender_task)


async def _within(until: float, awaitable):
    """Await within the monotonic deadline; TimeoutError past it."""
    return await asyncio.wait_for(awaitable, max(0.0, until - time.monotonic()))


def _retrieved(future: asyncio.Future) -> None:
    """Mark a record's outcome as seen, whether or not anyone still waits for it."""
    if not future.cancelled():
        future.exception()


def _settle(send: _Send, error: BaseException | None) -> None:
    if send.done.done():
        return
    if error is None:
        send.done.set_result(None)
    else:
        send.done.set_exception(error)
        # A caller that gave up waiting must not leave the error unretrieved.
        send.done.add_done_callback(_retrieved)


def _oversized(records: list[OutgoingRecord]) -> str | None:
    for record in records:
        size = (len(record.key or b"") + len(record.value or b"") + _RECORD_OVERHEAD
                + sum(len(name) + len(value) for name, value in record.headers))
        if size > _MAX_REQUEST_BYTES:
            return f"a record of {size} bytes is larger than a request may be"
    return None
