"""The config codec: the bytes of a record on `<p>.configs` in, a validated config out.

Every record of the configs topic passes through `decode_config_record` before anything
else looks at it. The answer is the desired state of one config (`Config`), a deletion
(`Tombstone`), or `InvalidRecord`, whose `reason` travels with the record to the DLQ as its
`error` header. The same rules serve the database (`config_from_json_dict`, when a stored
desired state is read back) and the command line (`check_document`, `config_json_schema`),
so whatever one of them accepts, the others accept too.

The validator is written by hand rather than with pydantic. The JSON front end has to be
our own anyway (duplicate keys, NaN literals and floats that overflow to infinity pass the
standard parser), and every rule here wants its own sentence naming the field, what it
expects and what came; pydantic's strict mode would give the right verdicts, but its
messages would have to be rewritten field by field. The JSON Schema is written by hand
from the same constants, and the unit tests hold the two to the same samples.

Two rules go beyond the contract's table because PostgreSQL could not store the config
otherwise, which would make the record a poison pill for the agent that writes it:
strings that are kept must not contain NUL characters or unpaired surrogates.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Literal
from urllib.parse import urlsplit

CONFIG_ID_PATTERN = r"[A-Za-z0-9._:-]{1,200}"
MAX_TEXT_CHARS = 200
MAX_URL_CHARS = 2048
MIN_INTERVAL_SECONDS = 0.05
MAX_INTERVAL_SECONDS = 86400.0
MIN_TIMEOUT_SECONDS = 0.1
MAX_TIMEOUT_SECONDS = 300.0
DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_VERSION = 2**63 - 1
SOURCE_TYPES = ("http",)
AUTH_TYPES = ("bearer", "basic")

_CONFIG_ID = re.compile(CONFIG_ID_PATTERN)
CONFIG_ID_RULE = "1 to 200 characters of A-Z a-z 0-9 . _ : -"
_INTERVAL_RULE = "a number from 0.05 to 86400"
_TIMEOUT_RULE = "a number from 0.1 to 300 (default 10)"
_TEXT_RULE = "a non-empty string of at most 200 characters"
_URL_RULE = "an http or https URL with a host"
_SECRET_RULE = (
    "the name of a file in RECONCILER_SECRETS_DIR: 1 to 200 characters, no '/', "
    "not starting with '.', no NUL"
)
_VERSION_RULE = "a JSON integer from 0 to 9223372036854775807 (like 3, not 3.0)"
_SHOWN_CHARS = 60


class InvalidRecord(Exception):
    """A record that is neither a valid config nor a valid tombstone.

    `reason` is one line a person can act on; it names the field, what is expected and
    what came. `problems` holds each problem on its own when there were several (the
    reason joins them with "; ").
    """

    def __init__(self, reason: str, *, problems: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.problems = tuple(problems) or (reason,)


@dataclass(frozen=True, slots=True)
class SourceAuth:
    type: Literal["bearer", "basic"]
    # The name of a file in RECONCILER_SECRETS_DIR, never the secret itself.
    secret: str


@dataclass(frozen=True, slots=True)
class HttpSource:
    url: str
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    auth: SourceAuth | None = None
    type: str = "http"


@dataclass(frozen=True, slots=True)
class Config:
    """The desired state of one config, as validated; build it through the codec."""

    id: str
    enabled: bool
    channel_id: str
    product_id: str
    interval_seconds: float
    source: HttpSource
    version: int | None = None

    def normalised(self) -> dict[str, Any]:
        """The contract's normalised content: what two records are compared by.

        Defaults are filled in and numbers are floats, so `5` and `5.0` compare equal;
        `version` is left out, and a dict ignores key order by nature.
        """
        auth = self.source.auth
        return {
            "id": self.id,
            "enabled": self.enabled,
            "channel_id": self.channel_id,
            "product_id": self.product_id,
            "interval_seconds": float(self.interval_seconds),
            "source": {
                "type": self.source.type,
                "url": self.source.url,
                "timeout_seconds": float(self.source.timeout_seconds),
                "auth": None if auth is None else {"type": auth.type, "secret": auth.secret},
            },
        }

    def to_json_dict(self) -> dict[str, Any]:
        """The whole desired state, for the database's jsonb column and for publishing."""
        source: dict[str, Any] = {
            "type": self.source.type,
            "url": self.source.url,
            "timeout_seconds": self.source.timeout_seconds,
        }
        if self.source.auth is not None:
            source["auth"] = {"type": self.source.auth.type, "secret": self.source.auth.secret}

        document: dict[str, Any] = {
            "id": self.id,
            "enabled": self.enabled,
            "channel_id": self.channel_id,
            "product_id": self.product_id,
            "interval_seconds": self.interval_seconds,
            "source": source,
        }
        if self.version is not None:
            document["version"] = self.version
        return document

    def to_json_bytes(self) -> bytes:
        """Compact UTF-8 JSON of `to_json_dict()`: the value of a record on `<p>.configs`."""
        return _dump_compact(self.to_json_dict())

    def with_changes(self, **changes: Any) -> Config:
        """A copy with some fields replaced, validated like a record (raises InvalidRecord)."""
        changed = dataclasses.replace(self, **changes)
        return config_from_json_dict(changed.to_json_dict())


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A record with a null value: the config is deleted."""

    id: str


def is_valid_config_id(text: str) -> bool:
    return _CONFIG_ID.fullmatch(text) is not None


def decode_config_record(
    key: bytes | None, value: bytes | None, *, max_record_bytes: int
) -> Config | Tombstone:
    """Decode one record of `<p>.configs`; raises InvalidRecord and nothing else.

    The size is checked before anything is decoded, so an oversized record costs nothing
    but its length. A null value is a tombstone; its key must still be a valid config id.
    """
    size = 0 if value is None else len(value)
    if size > max_record_bytes:
        raise InvalidRecord(
            f"record is {size} bytes, over the {max_record_bytes}-byte limit "
            "(RECONCILER_MAX_RECORD_BYTES)"
        )

    config_id = _record_key(key)
    if value is None:
        return Tombstone(config_id)

    data = parse_strict_json(value, what="value")
    if data is None:
        raise InvalidRecord(
            "value is the JSON text null, not a config; a deletion (tombstone) is a record "
            "whose value is null, not the text 'null'"
        )
    if not isinstance(data, dict):
        raise InvalidRecord(f"value must be one JSON object, got {_kind(data)}")

    return _config_or_raise(data, expected_id=config_id, expected_from="the record key")


def config_from_json_dict(data: dict[str, Any], *, expected_id: str | None = None) -> Config:
    """Validate an already-parsed config (from the database or the command line)."""
    if not isinstance(data, dict):
        raise InvalidRecord(f"a config must be a JSON object, got {_kind(data)}")
    return _config_or_raise(data, expected_id=expected_id, expected_from="the expected id")


def check_document(text: bytes) -> tuple[list[Config], list[str]]:
    """Check a document for `reconciler config put/validate`: one config or an array of them.

    Returns the valid configs and one line per problem, each prefixed with where it is:
    `[2] shop-42.sku-7: interval_seconds: ...` in an array, `shop-42.sku-7: ...` for a
    lone object. A document that holds one id twice has a problem: publishing it would
    leave only the later one in force.
    """
    try:
        data = parse_strict_json(text, what="document")
    except InvalidRecord as invalid:
        return [], [invalid.reason]

    if isinstance(data, dict):
        entries: list[tuple[int | None, Any]] = [(None, data)]
    elif isinstance(data, list) and data:
        entries = list(enumerate(data))
    elif isinstance(data, list):
        return [], ["document is an empty JSON array; it holds no config"]
    else:
        return [], [f"document must be one JSON object or a JSON array of objects, "
                    f"got {_kind(data)}"]

    configs: list[Config] = []
    problems: list[str] = []
    first_seen: dict[str, str] = {}
    for index, entry in entries:
        where = _where_in_document(index, entry)
        if not isinstance(entry, dict):
            problems.append(f"{where}: must be a JSON object, got {_kind(entry)}")
            continue

        config, entry_problems = _check_config(entry, expected_id=None, expected_from="")
        problems.extend(f"{where}: {problem}" for problem in entry_problems)
        if config is None:
            continue

        if config.id in first_seen:
            problems.append(
                f"{where}: id {_quote(config.id)} is also used by {first_seen[config.id]}; "
                "a document may hold each config once"
            )
            continue
        first_seen[config.id] = f"[{index}]"
        configs.append(config)

    return configs, problems


def config_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a config, printed by `reconciler config schema`.

    The validator is the authority. The schema agrees with it except where JSON Schema
    cannot say the rule: it cannot tell `3.0` from `3`, nor check that a URL has a host
    or that a string holds no unpaired surrogate; each description says the whole rule.
    """
    no_nul = r"^[^\u0000]*$"
    text = {"type": "string", "minLength": 1, "maxLength": MAX_TEXT_CHARS, "pattern": no_nul}
    auth = {
        "type": ["object", "null"],
        "description": "How to authenticate; the secret itself never travels in a record.",
        "required": ["type", "secret"],
        "properties": {
            "type": {"enum": list(AUTH_TYPES)},
            "secret": {
                "type": "string",
                "description": f"Must be {_SECRET_RULE}; the file holds the bearer token "
                "or user:password.",
                "minLength": 1,
                "maxLength": MAX_TEXT_CHARS,
                "pattern": r"^[^/.\u0000][^/\u0000]*$",
            },
        },
    }
    source = {
        "type": "object",
        "required": ["type", "url"],
        "properties": {
            "type": {"const": "http", "description": "'http' is the only type in version 1."},
            "url": {
                "type": "string",
                "description": f"Must be {_URL_RULE}, at most {MAX_URL_CHARS} characters.",
                "format": "uri",
                "maxLength": MAX_URL_CHARS,
                "pattern": r"^[Hh][Tt][Tt][Pp][Ss]?://[^/?#\s]+([/?#]\S*)?$",
            },
            "timeout_seconds": {
                "type": ["number", "null"],
                "description": "Bounds each request.",
                "minimum": MIN_TIMEOUT_SECONDS,
                "maximum": MAX_TIMEOUT_SECONDS,
                "default": DEFAULT_TIMEOUT_SECONDS,
            },
            "auth": auth,
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Pull config (contract version 1)",
        "description": "One record of the configs topic: the whole desired state of one "
        "config. Unknown fields are ignored.",
        "type": "object",
        "required": ["id", "enabled", "channel_id", "product_id", "interval_seconds", "source"],
        "properties": {
            "id": {
                "type": "string",
                "description": f"Must be {CONFIG_ID_RULE}; equal to the record key.",
                "pattern": f"^{CONFIG_ID_PATTERN}$",
            },
            "enabled": {"type": "boolean"},
            "channel_id": text,
            "product_id": dict(text),
            "interval_seconds": {
                "type": "number",
                "minimum": MIN_INTERVAL_SECONDS,
                "maximum": MAX_INTERVAL_SECONDS,
            },
            "source": source,
            "version": {
                "type": ["integer", "null"],
                "description": f"Must be {_VERSION_RULE}.",
                "minimum": 0,
                "maximum": MAX_VERSION,
            },
        },
    }


# --- JSON front end -------------------------------------------------------------------


class _Rejected(Exception):
    """Raised from inside the JSON parser's hooks to stop at the first bad token."""


def parse_strict_json(raw: bytes, *, what: str) -> Any:
    """Parse exactly one JSON text, stricter than `json.loads`; raises InvalidRecord.

    Rejected beyond the grammar: duplicate keys at any depth, the NaN/Infinity literals,
    numbers that overflow a float, and nesting too deep for the parser. `what` names the
    input in the reason ("value", "document", "event").
    """
    if len(raw) == 0:
        raise InvalidRecord(
            f"{what} is empty; it must be one JSON object (only a null value, not empty "
            "bytes, deletes a config)"
        )

    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRecord(
            f"{what} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at position "
            f"{error.start})"
        ) from None

    try:
        return json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            parse_constant=_reject_constant,
        )
    except _Rejected as rejected:
        raise InvalidRecord(f"{what}: {rejected}") from None
    except json.JSONDecodeError as error:
        raise InvalidRecord(
            f"{what} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
        ) from None
    except RecursionError:
        raise InvalidRecord(f"{what} is nested too deeply to be parsed") from None


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, item in pairs:
        if name in result:
            raise _Rejected(f"duplicate key {_quote(name)} in JSON object")
        result[name] = item
    return result


def _finite_float(token: str) -> float:
    number = float(token)
    if math.isinf(number):
        raise _Rejected(f"number {shorten(token)} is too large for a float")
    return number


def _bounded_int(token: str) -> int:
    # Python refuses to convert integers of more than a few thousand digits.
    try:
        return int(token)
    except ValueError:
        raise _Rejected(f"an integer of {len(token)} digits is too long") from None


def _reject_constant(token: str) -> Any:
    raise _Rejected(f"{token} is not a JSON number")


def _dump_compact(document: Any) -> bytes:
    return json.dumps(
        document, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


# --- the rules of the contract's "A config" section ----------------------------------


class _Invalid:
    """Marks a field that failed its rule; its problem is already recorded."""


_INVALID: Any = _Invalid()


def _record_key(key: bytes | None) -> str:
    if key is None:
        raise InvalidRecord("record has no key; the key must be the config id")

    try:
        text = bytes(key).decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidRecord(
            f"record key is not valid UTF-8 (byte 0x{key[error.start]:02x} at position "
            f"{error.start})"
        ) from None

    if not is_valid_config_id(text):
        raise InvalidRecord(
            f"record key {_quote(text)} is not a valid config id: it must be {CONFIG_ID_RULE}"
        )
    return text


def _config_or_raise(
    data: dict[str, Any], *, expected_id: str | None, expected_from: str
) -> Config:
    config, problems = _check_config(data, expected_id=expected_id, expected_from=expected_from)
    if config is None:
        raise InvalidRecord("; ".join(problems), problems=problems)
    return config


def _check_config(
    data: dict[str, Any], *, expected_id: str | None, expected_from: str
) -> tuple[Config | None, list[str]]:
    problems: list[str] = []

    config_id = _field(data, "id", CONFIG_ID_RULE, _config_id, problems)
    enabled = _field(data, "enabled", "a JSON boolean (true or false)", _boolean, problems)
    channel_id = _field(data, "channel_id", _TEXT_RULE, _text, problems)
    product_id = _field(data, "product_id", _TEXT_RULE, _text, problems)
    interval = _field(data, "interval_seconds", _INTERVAL_RULE, _interval, problems)
    source = _field(data, "source", "a JSON object with type and url", _source, problems)
    version = _field(data, "version", _VERSION_RULE, _version, problems, required=False)

    if expected_id is not None and isinstance(config_id, str) and config_id != expected_id:
        problems.append(
            f"id {_quote(config_id)} differs from {expected_from} {_quote(expected_id)}"
        )

    if problems:
        return None, problems
    config = Config(
        id=config_id,
        enabled=enabled,
        channel_id=channel_id,
        product_id=product_id,
        interval_seconds=interval,
        source=source,
        version=version,
    )
    return config, []


def _field(
    data: dict[str, Any],
    name: str,
    rule: str,
    check: Callable[[str, Any, list[str]], Any],
    problems: list[str],
    *,
    path: str = "",
    required: bool = True,
    default: Any = None,
) -> Any:
    """Look up one field and run its check; record a problem and return _INVALID if it fails.

    An optional field that is absent or null takes its default; null is how many
    serialisers write "absent", and it carries no other meaning here.
    """
    where = f"{path}{name}"
    if name not in data or (data[name] is None and not required):
        if required:
            problems.append(f"{where}: is missing; it must be {rule}")
            return _INVALID
        return default

    problem_count = len(problems)
    value = check(where, data[name], problems)
    if isinstance(value, str) and len(problems) == problem_count:
        return value if _storable(where, value, problems) else _INVALID
    return value


def _storable(where: str, text: str, problems: list[str]) -> bool:
    # PostgreSQL's jsonb refuses both; a config it cannot store would block its partition.
    if "\x00" in text:
        problems.append(f"{where}: must not contain NUL characters")
        return False
    if any("\ud800" <= char <= "\udfff" for char in text):
        problems.append(f"{where}: must be valid Unicode text (it holds an unpaired surrogate)")
        return False
    return True


def _config_id(where: str, value: Any, problems: list[str]) -> Any:
    if not isinstance(value, str) or not is_valid_config_id(value):
        return _fail(where, f"must be {CONFIG_ID_RULE}", value, problems)
    return value


def _boolean(where: str, value: Any, problems: list[str]) -> Any:
    if not isinstance(value, bool):
        return _fail(where, "must be a JSON boolean (true or false)", value, problems)
    return value


def _text(where: str, value: Any, problems: list[str]) -> Any:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_TEXT_CHARS:
        return _fail(where, f"must be {_TEXT_RULE}", value, problems)
    return value


def _interval(where: str, value: Any, problems: list[str]) -> Any:
    return _number_in_range(
        where, value, MIN_INTERVAL_SECONDS, MAX_INTERVAL_SECONDS, _INTERVAL_RULE, problems
    )


def _timeout(where: str, value: Any, problems: list[str]) -> Any:
    return _number_in_range(
        where, value, MIN_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS, _TIMEOUT_RULE, problems
    )


def _number_in_range(
    where: str, value: Any, low: float, high: float, rule: str, problems: list[str]
) -> Any:
    # bool is an int to Python but not a number to JSON; compare before converting, so
    # that an integer too large for a float fails the range instead of overflowing.
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not low <= value <= high:
        return _fail(where, f"must be {rule}", value, problems)
    return float(value)


def _version(where: str, value: Any, problems: list[str]) -> Any:
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    if not is_integer or not 0 <= value <= MAX_VERSION:
        return _fail(where, f"must be {_VERSION_RULE}", value, problems)
    return value


def _source(where: str, value: Any, problems: list[str]) -> Any:
    if not isinstance(value, dict):
        return _fail(where, "must be a JSON object with type and url", value, problems)

    count = len(problems)
    inner = f"{where}."
    source_type = _field(value, "type", "'http'", _source_type, problems, path=inner)
    url = _field(value, "url", _URL_RULE, _url, problems, path=inner)
    timeout = _field(
        value, "timeout_seconds", _TIMEOUT_RULE, _timeout, problems,
        path=inner, required=False, default=DEFAULT_TIMEOUT_SECONDS,
    )
    auth = _field(value, "auth", "a JSON object", _auth, problems, path=inner, required=False)

    if len(problems) > count:
        return _INVALID
    return HttpSource(url=url, timeout_seconds=timeout, auth=auth, type=source_type)


def _source_type(where: str, value: Any, problems: list[str]) -> Any:
    if isinstance(value, str) and value not in SOURCE_TYPES:
        problems.append(
            f"{where}: {_quote(value)} is not supported; 'http' is the only type in version 1"
        )
        return _INVALID
    if not isinstance(value, str):
        return _fail(where, "must be the string 'http', the only type in version 1", value,
                     problems)
    return value


def _url(where: str, value: Any, problems: list[str]) -> Any:
    if not isinstance(value, str):
        return _fail(where, f"must be a string holding {_URL_RULE}", value, problems)
    if len(value) > MAX_URL_CHARS:
        problems.append(
            f"{where}: must be at most {MAX_URL_CHARS} characters, got {len(value)} characters"
        )
        return _INVALID
    # urlsplit quietly drops tabs and newlines; a URL that needs them is not one we send.
    if any(char.isspace() or unicodedata.category(char) in ("Cc", "Cs") for char in value):
        problems.append(f"{where}: must not contain spaces or control characters")
        return _INVALID

    if not _is_http_url(value):
        return _fail(where, f"must be {_URL_RULE}", value, problems)
    if "@" in urlsplit(value).netloc:
        # Secrets never travel in records; the message leaves the URL out for that reason.
        problems.append(
            f"{where}: must not carry a user or password; use source.auth with a secret file"
        )
        return _INVALID
    problem = _host_problem(urlsplit(value).hostname or "")
    if problem:
        problems.append(f"{where}: {problem}")
        return _INVALID
    return value


def _host_problem(host: str) -> str | None:
    """Why a request could never go to this host, or None."""
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+|0[xX][0-9a-fA-F.xX]*", host):
        return ("the host looks like an IPv4 address but is not one in the usual form; "
                "write it as four decimal numbers, like 10.0.0.7")
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        return ("the host is not a valid host name: each dot-separated label must be 1 to 63 "
                "characters")
    if len(encoded) > 253:
        return "the host name is longer than 253 characters"
    return None


def _is_http_url(text: str) -> bool:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:  # for example an unclosed IPv6 bracket
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _auth(where: str, value: Any, problems: list[str]) -> Any:
    expected = 'a JSON object like {"type": "bearer", "secret": NAME}'
    if not isinstance(value, dict):
        return _fail(where, f"must be {expected}", value, problems)

    count = len(problems)
    inner = f"{where}."
    auth_type = _field(value, "type", "'bearer' or 'basic'", _auth_type, problems, path=inner)
    secret = _field(value, "secret", _SECRET_RULE, _secret, problems, path=inner)

    if len(problems) > count:
        return _INVALID
    return SourceAuth(type=auth_type, secret=secret)


def _auth_type(where: str, value: Any, problems: list[str]) -> Any:
    if not isinstance(value, str) or value not in AUTH_TYPES:
        return _fail(where, "must be 'bearer' or 'basic'", value, problems)
    return value


def _secret(where: str, value: Any, problems: list[str]) -> Any:
    # The name is joined to a folder path: no separators and no dot files, so that
    # neither '../x' nor '.' can reach outside the folder or name the folder itself.
    is_name = (
        isinstance(value, str)
        and 1 <= len(value) <= MAX_TEXT_CHARS
        and "/" not in value
        and "\x00" not in value
        and not value.startswith(".")
    )
    if not is_name:
        return _fail(where, f"must be {_SECRET_RULE}", value, problems)
    return value


def _fail(where: str, expectation: str, value: Any, problems: list[str]) -> Any:
    problems.append(f"{where}: {expectation}, got {_kind(value)}")
    return _INVALID


# --- showing values in messages -------------------------------------------------------


def _kind(value: Any) -> str:
    """A value as a message shows it: numbers as written, strings quoted, containers named."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 1000:
        # Too long to show, and Python refuses to print integers of over 4300 digits.
        return "an integer of over 300 digits"
    if isinstance(value, (int, float)):
        return shorten(json.dumps(value))
    if isinstance(value, str):
        return f"the string {_quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _quote(text: str) -> str:
    # Escaped so that the reason stays one line and encodes as UTF-8 whatever came.
    shown = text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS]
    escaped = json.dumps(shown, ensure_ascii=False)[1:-1]
    escaped = escaped.encode("utf-8", "backslashreplace").decode("utf-8")
    if shown is text:
        return f"'{escaped}'"
    return f"'{escaped}…' ({len(text)} characters)"


def shorten(text: str, limit: int = _SHOWN_CHARS) -> str:
    """The text, or its first `limit` characters and how long it was: for quoting what a
    record holds in a reason or a log line."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text)} characters)"


def _where_in_document(index: int | None, entry: Any) -> str:
    config_id = entry.get("id") if isinstance(entry, dict) else None
    label = config_id if isinstance(config_id, str) and is_valid_config_id(config_id) else None
    if index is None:
        return label or "config"
    return f"[{index}] {label}" if label else f"[{index}]"
