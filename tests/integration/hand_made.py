"""Records no ordinary Kafka client writes: header names whose bytes are not UTF-8.

aiokafka's pure-Python record builder, run in a child process (the choice between its C
and Python code is made at import), is given a `str` whose encoding is not UTF-8.
"""

from __future__ import annotations

import asyncio
import json
import sys

_WRITER = """
import asyncio, json, os, sys
os.environ["AIOKAFKA_NO_EXTENSIONS"] = "1"
from aiokafka import AIOKafkaProducer

class NotUtf8(str):
    def encode(self, *args, **kwargs):
        return b"\\xff\\xfe" + str.encode(self)

async def main(servers, topic, records):
    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=200)
    await producer.start()
    try:
        sent = []
        for key, value, bad in records:
            headers = [(NotUtf8("name"), b"v")] if bad else [("traceparent", b"00-x")]
            sent.append(await producer.send(topic, key=key.encode(), value=value.encode(),
                                            headers=headers))
        for done in sent:
            metadata = await done
            print(metadata.partition, metadata.offset)
    finally:
        await producer.stop()

asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))
"""


async def publish(servers: str, topic: str,
                  records: list[tuple[str, str, bool]]) -> list[tuple[int, int]]:
    """Send (key, value, with a bad header name?) records in one batch where they share a
    partition; return each one's (partition, offset)."""
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _WRITER, servers, topic, json.dumps(records),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(writer.communicate(), 60)
    assert writer.returncode == 0
    return [tuple(map(int, line.split())) for line in out.decode().splitlines()]
