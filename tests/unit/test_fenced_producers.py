"""Futures a fenced producer fails after nobody waits for them are not reported as errors;
every other unretrieved failure still is."""

from __future__ import annotations

import asyncio
import gc
import logging

from aiokafka.errors import ProducerFenced

from streams.transactions import quiet_fenced_producers


def abandon(loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
    future = loop.create_future()
    future.set_exception(error)
    del future
    gc.collect()


def test_only_fenced_producers_failures_are_quiet(caplog) -> None:
    loop = asyncio.new_event_loop()
    try:
        quiet_fenced_producers(loop)
        quiet_fenced_producers(loop)  # once per loop, however many instances start
        with caplog.at_level(logging.DEBUG):
            abandon(loop, ProducerFenced())
            abandon(loop, RuntimeError("something else"))
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        assert "something else" in str(errors[0].exc_info[1])
        assert any("fenced producer" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.DEBUG)
    finally:
        loop.close()
