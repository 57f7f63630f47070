"""The HTTP endpoints say which port they could not take, and what to do about it."""

from __future__ import annotations

import socket

import pytest

from reconciler.http import EndpointsUnavailable, HttpEndpoints


async def _yes() -> bool:
    return True


def endpoints(port: int) -> HttpEndpoints:
    return HttpEndpoints(port=port, host="127.0.0.1", joined=lambda: True,
                         database_answers=_yes, metrics_text=lambda: "")


async def test_a_port_already_taken_is_named_with_the_setting_to_change() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(EndpointsUnavailable,
                           match=f"127.0.0.1:{port}: .*RECONCILER_HTTP_PORT"):
            await endpoints(port).start()
    finally:
        taken.close()
