"""Log set-up: one line per event, with the run's fields, as text or as JSON.

Callers pass `config_id`, `run_id` and `instance_id` through `extra=`; the formatters put
them at the end of a text line (`config_id=… run_id=…`) or as JSON keys, with the trace
and span ids of the current span when there is one.
"""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry import trace

FIELDS = ("config_id", "run_id", "instance_id", "fence", "reason", "partition", "offset")


def _context_fields(record: logging.LogRecord) -> dict[str, object]:
    fields = {name: getattr(record, name) for name in FIELDS if hasattr(record, name)}
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = format(span.trace_id, "032x")
        fields["span_id"] = format(span.span_id, "016x")
    return fields


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _context_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_context_fields(record),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def setup_logging(*, level: str = "INFO", json_format: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The client libraries are chatty at INFO about every rebalance step.
    for name in ("faust", "mode"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # aiokafka logs an error for every failed connection attempt, thousands a second while
    # the broker is away; the instance reports an unreachable broker itself, once.
    logging.getLogger("aiokafka").setLevel(max(logging.CRITICAL, root.level))
    # asyncpg's pool logs a traceback for every failed reconnect; the instance reports a
    # database outage itself, once per affected operation.
    logging.getLogger("asyncpg").setLevel(max(logging.ERROR, root.level))
