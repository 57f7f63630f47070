"""The configs stream's batches: records of different configs are handled at once, the
records of one config one after the other, in partition order."""

from __future__ import annotations

import asyncio

from streams.config_stream import ConfigRecord, ConfigStream
from streams.connection import KafkaConnection


def record(key: str, offset: int) -> ConfigRecord:
    return ConfigRecord(key=key.encode(), value=b"{}", partition=0, offset=offset,
                        timestamp=None, headers=[])


async def test_a_batch_handles_different_configs_together_and_one_config_in_order():
    log: list[tuple[str, int]] = []
    in_flight: list[int] = []
    most_at_once = 0

    async def handle(r: ConfigRecord) -> None:
        nonlocal most_at_once
        in_flight.append(r.offset)
        most_at_once = max(most_at_once, len(in_flight))
        log.append(("start", r.offset))
        await asyncio.sleep(0.01)
        log.append(("end", r.offset))
        in_flight.remove(r.offset)

    async def ignore(*_: object) -> None:
        pass

    stream = ConfigStream(connection=KafkaConnection(bootstrap_servers="127.0.0.1:1"),
                          topic="t.configs", group_id="t", handle_record=handle,
                          on_assigned=ignore, on_revoked=ignore)
    try:
        await stream._handle_batch([record("a", 0), record("b", 1), record("c", 2),
                                    record("a", 3), record("d", 4)])
    finally:
        await stream.stop()

    # a, b and c at once; the second record of a (and d after it) only once they ended.
    assert most_at_once == 3
    assert log.index(("start", 3)) > max(log.index(("end", n)) for n in (0, 1, 2))
    assert log.index(("start", 4)) > log.index(("end", 2))
