"""The config codec against the contract's "A config" section, rule by rule."""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.configs import (
    Config,
    HttpSource,
    InvalidRecord,
    SourceAuth,
    Tombstone,
    check_document,
    config_from_json_dict,
    config_json_schema,
    decode_config_record,
)

LIMIT = 65536
KEY = b"shop-42.sku-7"

# The contract's example, byte for byte in spirit: integers where it has integers.
CONTRACT_EXAMPLE = b"""{
  "id": "shop-42.sku-7",
  "enabled": true,
  "channel_id": "shop-42",
  "product_id": "sku-7",
  "interval_seconds": 5,
  "source": {"type": "http", "url": "https://orders.example.com/v1/orders",
             "timeout_seconds": 10, "auth": {"type": "bearer", "secret": "shop-42-token"}},
  "version": 3
}"""

EXAMPLE_CONFIG = Config(
    id="shop-42.sku-7",
    enabled=True,
    channel_id="shop-42",
    product_id="sku-7",
    interval_seconds=5.0,
    source=HttpSource(
        url="https://orders.example.com/v1/orders",
        timeout_seconds=10.0,
        auth=SourceAuth(type="bearer", secret="shop-42-token"),
    ),
    version=3,
)


def example() -> dict[str, Any]:
    return json.loads(CONTRACT_EXAMPLE)


def decode(document: Any, *, key: bytes | None = KEY, limit: int = LIMIT) -> Config | Tombstone:
    return decode_config_record(key, json.dumps(document).encode(), max_record_bytes=limit)


def reason_of(key: bytes | None, value: bytes | None, *, limit: int = LIMIT) -> str:
    with pytest.raises(InvalidRecord) as caught:
        decode_config_record(key, value, max_record_bytes=limit)
    reason = caught.value.reason
    assert reason and "\n" not in reason
    return reason


def with_field(path: str, value: Any) -> dict[str, Any]:
    """The contract's example with one field (dotted path) set to `value`."""
    document = example()
    *parents, name = path.split(".")
    target = document
    for parent in parents:
        target = target[parent]
    target[name] = value
    return document


def without_field(path: str) -> dict[str, Any]:
    document = example()
    *parents, name = path.split(".")
    target = document
    for parent in parents:
        target = target[parent]
    del target[name]
    return document


# --- the example and what equal means -------------------------------------------------


def test_contract_example_decodes_to_the_expected_config():
    assert decode_config_record(KEY, CONTRACT_EXAMPLE, max_record_bytes=LIMIT) == EXAMPLE_CONFIG


def test_contract_example_round_trips_through_to_json_bytes():
    config = decode_config_record(KEY, CONTRACT_EXAMPLE, max_record_bytes=LIMIT)

    again = decode_config_record(KEY, config.to_json_bytes(), max_record_bytes=LIMIT)

    assert again == config
    assert again.normalised() == config.normalised()
    assert again.to_json_dict() == config.to_json_dict()


def test_contract_example_round_trips_through_to_json_dict_as_the_database_reads_it():
    config = decode_config_record(KEY, CONTRACT_EXAMPLE, max_record_bytes=LIMIT)

    stored = json.loads(json.dumps(config.to_json_dict()))

    assert config_from_json_dict(stored, expected_id="shop-42.sku-7") == config


def test_to_json_bytes_is_compact_utf8_json_of_the_whole_desired_state():
    config = EXAMPLE_CONFIG.with_changes(channel_id="café")

    raw = config.to_json_bytes()

    assert b" " not in raw.replace(b"https://orders", b"")
    assert "café".encode() in raw
    assert json.loads(raw) == config.to_json_dict()
    assert json.loads(raw)["version"] == 3
    assert json.loads(raw)["source"]["auth"] == {"type": "bearer", "secret": "shop-42-token"}


def test_to_json_dict_leaves_out_version_and_auth_when_there_are_none():
    config = EXAMPLE_CONFIG.with_changes(
        version=None, source=HttpSource(url="https://orders.example.com/v1/orders")
    )

    document = config.to_json_dict()

    assert "version" not in document
    assert "auth" not in document["source"]
    assert document["source"]["timeout_seconds"] == 10.0


def test_integer_and_float_interval_have_equal_normalised_content():
    as_integer = decode(with_field("interval_seconds", 5))
    as_float = decode(with_field("interval_seconds", 5.0))

    assert as_integer.normalised() == as_float.normalised()
    assert isinstance(as_integer.normalised()["interval_seconds"], float)


def test_integer_and_float_timeout_have_equal_normalised_content():
    as_integer = decode(with_field("source.timeout_seconds", 10))
    as_float = decode(with_field("source.timeout_seconds", 10.0))

    assert as_integer.normalised() == as_float.normalised()


def test_key_order_does_not_change_normalised_content():
    document = example()
    reordered = dict(reversed(list(document.items())))
    reordered["source"] = dict(reversed(list(document["source"].items())))

    assert decode(reordered).normalised() == decode(document).normalised()


def test_normalised_content_leaves_out_version():
    assert decode(with_field("version", 3)).normalised() == decode(
        with_field("version", 9)
    ).normalised()
    assert "version" not in EXAMPLE_CONFIG.normalised()


def test_normalised_content_fills_in_the_default_timeout():
    explicit = decode(with_field("source.timeout_seconds", 10))
    defaulted = decode(without_field("source.timeout_seconds"))

    assert defaulted.source.timeout_seconds == 10.0
    assert defaulted.normalised() == explicit.normalised()


def test_normalised_content_differs_when_anything_but_version_differs():
    base = decode(example()).normalised()

    assert decode(with_field("enabled", False)).normalised() != base
    assert decode(with_field("interval_seconds", 6)).normalised() != base
    assert decode(with_field("source.auth.type", "basic")).normalised() != base


def test_unknown_fields_are_ignored_at_every_level():
    document = example()
    document["owner_team"] = {"anything": [1, 2, {"deep": None}]}
    document["source"]["proxy"] = "ignored"
    document["source"]["auth"]["comment"] = "ignored"

    config = decode(document)

    assert config == EXAMPLE_CONFIG
    assert "owner_team" not in config.to_json_dict()


def test_optional_fields_may_be_absent():
    document = without_field("version")
    del document["source"]["timeout_seconds"]
    del document["source"]["auth"]

    config = decode(document)

    assert config.version is None
    assert config.source.timeout_seconds == 10.0
    assert config.source.auth is None


@pytest.mark.parametrize("path", ["version", "source.timeout_seconds", "source.auth"])
def test_optional_field_given_as_null_counts_as_absent(path):
    assert decode(with_field(path, None)) == decode(without_field(path))


# --- keys and tombstones --------------------------------------------------------------


def test_null_value_is_a_tombstone_for_the_key():
    assert decode_config_record(KEY, None, max_record_bytes=LIMIT) == Tombstone("shop-42.sku-7")


def test_record_without_a_key_is_invalid():
    assert reason_of(None, CONTRACT_EXAMPLE) == "record has no key; the key must be the config id"


def test_tombstone_without_a_key_is_invalid():
    assert reason_of(None, None).startswith("record has no key")


@pytest.mark.parametrize("key", [b"", b"a b", b"x" * 201, b"shop/42", "caf\u00e9".encode()])
def test_tombstone_whose_key_is_not_a_valid_id_is_invalid(key):
    assert "is not a valid config id" in reason_of(key, None)


def test_key_that_is_not_utf8_is_invalid():
    assert reason_of(b"ab\xff", None) == "record key is not valid UTF-8 (byte 0xff at position 2)"


def test_id_that_differs_from_the_key_is_invalid():
    reason = reason_of(b"b", json.dumps(with_field("id", "a")).encode())

    assert reason == "id 'a' differs from the record key 'b'"


def test_id_of_200_allowed_characters_is_valid():
    config_id = ("Az09._:-" * 25)[:200]

    config = decode(with_field("id", config_id), key=config_id.encode())

    assert config.id == config_id


# --- size and framing -----------------------------------------------------------------


def test_record_over_the_size_limit_is_rejected_before_decoding():
    oversized = b"\xff" * 70000  # not even UTF-8: decoding would have said so

    assert reason_of(KEY, oversized) == (
        "record is 70000 bytes, over the 65536-byte limit (RECONCILER_MAX_RECORD_BYTES)"
    )


def test_record_over_the_size_limit_is_rejected_even_without_a_key():
    assert reason_of(None, b"{}" * 50, limit=10).startswith("record is 100 bytes")


def test_record_exactly_at_the_size_limit_is_accepted():
    document = example()
    document["padding"] = ""
    size = len(json.dumps(document).encode())
    document["padding"] = "x" * (1000 - size)

    assert isinstance(decode(document, limit=1000), Config)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"", "value is empty"),
        (b"null", "value is the JSON text null, not a config"),
        (b" null ", "value is the JSON text null, not a config"),
        (b"[]", "value must be one JSON object, got an array"),
        (b"[" + CONTRACT_EXAMPLE + b"]", "value must be one JSON object, got an array"),
        (b"5", "value must be one JSON object, got 5"),
        (b'"shop"', "value must be one JSON object, got the string 'shop'"),
        (b"true", "value must be one JSON object, got true"),
        (CONTRACT_EXAMPLE + b" x", "value is not valid JSON: Extra data"),
        (CONTRACT_EXAMPLE + CONTRACT_EXAMPLE, "value is not valid JSON: Extra data"),
        (b'{"id": "shop-42.sku-7",', "value is not valid JSON"),
        (b"\xef\xbb\xbf" + CONTRACT_EXAMPLE, "value is not valid JSON: Unexpected UTF-8 BOM"),
        (b'{"a": "\xff"}', "value is not valid UTF-8 (byte 0xff at position 7)"),
        (b'{"id": "\xed\xa0\x80"}', "value is not valid UTF-8 (byte 0xed at position 8)"),
        (b"{'id': 'a'}", "value is not valid JSON"),
    ],
)
def test_value_that_is_not_exactly_one_json_object_is_invalid(value, expected):
    assert reason_of(KEY, value).startswith(expected)


@pytest.mark.parametrize(
    "value",
    [
        b'{"enabled": true, "enabled": false}',
        b'{"source": {"url": "a", "url": "b"}}',
        b'{"extra": [{"k": 1, "k": 1}]}',
    ],
)
def test_duplicate_keys_at_any_depth_are_invalid(value):
    assert "duplicate key" in reason_of(KEY, value)


def test_duplicate_key_reason_names_the_key():
    assert reason_of(KEY, b'{"enabled": true, "enabled": false}') == (
        "value: duplicate key 'enabled' in JSON object"
    )


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_nan_and_infinity_literals_are_invalid_anywhere(literal):
    top = json.dumps(with_field("interval_seconds", 1)).encode().replace(
        b'"interval_seconds": 1', b'"interval_seconds": ' + literal
    )
    unknown = b'{"extra": ' + literal + b"}"

    assert "is not a JSON number" in reason_of(KEY, top)
    assert "is not a JSON number" in reason_of(KEY, unknown)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1" * 400 + b".0"])
def test_number_too_large_for_a_float_is_invalid(number):
    value = b'{"interval_seconds": ' + number + b"}"

    assert "is too large for a float" in reason_of(KEY, value)


def test_integer_with_thousands_of_digits_is_invalid_not_a_crash():
    assert "digits is too long" in reason_of(KEY, b'{"version": ' + b"9" * 5000 + b"}")


@pytest.mark.parametrize("opening", [b"[", b'{"a":'])
def test_deeply_nested_json_is_invalid_not_a_crash(opening):
    value = b'{"extra": ' + opening * 200_000

    assert reason_of(KEY, value, limit=10**7) == "value is nested too deeply to be parsed"


# --- the field rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["id", "enabled", "channel_id", "product_id", "interval_seconds", "source", "source.type",
     "source.url", "source.auth.type", "source.auth.secret"],
)
def test_missing_required_field_is_invalid_and_named(path):
    reason = reason_of(KEY, json.dumps(without_field(path)).encode())

    assert reason.startswith(f"{path}: is missing; it must be ")


INVALID_FIELDS = [
    # (path, value, what the reason says after "<path>: ")
    ("id", "", "must be 1 to 200 characters of A-Z a-z 0-9 . _ : -, got the string ''"),
    ("id", "shop 42", "must be 1 to 200 characters"),
    ("id", "x" * 201, "must be 1 to 200 characters"),
    ("id", "caf\u00e9", "must be 1 to 200 characters"),
    ("id", "a\n", "must be 1 to 200 characters"),
    ("id", 42, "must be 1 to 200 characters of A-Z a-z 0-9 . _ : -, got 42"),
    ("enabled", 1, "must be a JSON boolean (true or false), got 1"),
    ("enabled", 0, "must be a JSON boolean (true or false), got 0"),
    ("enabled", "true", "must be a JSON boolean (true or false), got the string 'true'"),
    ("enabled", None, "must be a JSON boolean (true or false), got null"),
    ("channel_id", "", "must be a non-empty string of at most 200 characters, got the string ''"),
    ("channel_id", "c" * 201, "must be a non-empty string of at most 200 characters"),
    ("channel_id", 42, "must be a non-empty string of at most 200 characters, got 42"),
    ("channel_id", None, "must be a non-empty string of at most 200 characters, got null"),
    ("channel_id", "a\x00b", "must not contain NUL characters"),
    ("channel_id", "a\ud800", "must be valid Unicode text (it holds an unpaired surrogate)"),
    ("product_id", "", "must be a non-empty string of at most 200 characters"),
    ("product_id", "p" * 201, "must be a non-empty string of at most 200 characters"),
    ("product_id", ["sku-7"], "must be a non-empty string of at most 200 characters, got an array"),
    ("interval_seconds", 0, "must be a number from 0.05 to 86400, got 0"),
    ("interval_seconds", 0.049, "must be a number from 0.05 to 86400, got 0.049"),
    ("interval_seconds", -5, "must be a number from 0.05 to 86400, got -5"),
    ("interval_seconds", 86400.001, "must be a number from 0.05 to 86400, got 86400.001"),
    ("interval_seconds", 10**30, "must be a number from 0.05 to 86400"),
    ("interval_seconds", "5", "must be a number from 0.05 to 86400, got the string '5'"),
    ("interval_seconds", True, "must be a number from 0.05 to 86400, got true"),
    ("interval_seconds", None, "must be a number from 0.05 to 86400, got null"),
    ("source", "https://orders.example.com", "must be a JSON object with type and url"),
    ("source", [], "must be a JSON object with type and url, got an array"),
    ("source", None, "must be a JSON object with type and url, got null"),
    ("source.type", "ftp", "'ftp' is not supported; 'http' is the only type in version 1"),
    ("source.type", "HTTP", "'HTTP' is not supported; 'http' is the only type in version 1"),
    ("source.type", 1, "must be the string 'http', the only type in version 1, got 1"),
    ("source.url", "file:///etc/passwd", "must be an http or https URL with a host"),
    ("source.url", "ftp://orders.example.com/x", "must be an http or https URL with a host"),
    ("source.url", "https://", "must be an http or https URL with a host"),
    ("source.url", "https:///v1/orders", "must be an http or https URL with a host"),
    ("source.url", "//orders.example.com/v1", "must be an http or https URL with a host"),
    ("source.url", "orders.example.com", "must be an http or https URL with a host"),
    ("source.url", "http://orders.example.com:99999/", "must be an http or https URL"),
    ("source.url", "http://[::1/", "must be an http or https URL with a host"),
    ("source.url", "http://orders.example.com/a b", "must not contain spaces or control"),
    ("source.url", "http://orders.exa\nmple.com/", "must not contain spaces or control"),
    ("source.url", "https://h.example/" + "p" * 2040, "must be at most 2048 characters"),
    ("source.url", 5, "must be a string holding an http or https URL with a host, got 5"),
    ("source.timeout_seconds", 0, "must be a number from 0.1 to 300 (default 10), got 0"),
    ("source.timeout_seconds", 0.09, "must be a number from 0.1 to 300 (default 10)"),
    ("source.timeout_seconds", 300.5, "must be a number from 0.1 to 300 (default 10)"),
    ("source.timeout_seconds", "10", "must be a number from 0.1 to 300 (default 10)"),
    ("source.timeout_seconds", False, "must be a number from 0.1 to 300 (default 10), got false"),
    ("source.auth", "shop-42-token", 'must be a JSON object like {"type": "bearer"'),
    ("source.auth", [], 'must be a JSON object like {"type": "bearer"'),
    ("source.auth.type", "digest", "must be 'bearer' or 'basic', got the string 'digest'"),
    ("source.auth.type", "Bearer", "must be 'bearer' or 'basic'"),
    ("source.auth.type", ["bearer"], "must be 'bearer' or 'basic', got an array"),
    ("source.auth.secret", "", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", "../etc/passwd", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", "/etc/passwd", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", "tokens/shop", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", ".", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", "..", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", ".env", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", "tok\x00en", "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", "s" * 201, "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("source.auth.secret", 7, "must be the name of a file in RECONCILER_SECRETS_DIR"),
    ("version", 3.0, "must be a JSON integer from 0 to 9223372036854775807 (like 3, not 3.0)"),
    ("version", True, "must be a JSON integer from 0 to 9223372036854775807"),
    ("version", -1, "must be a JSON integer from 0 to 9223372036854775807"),
    ("version", 2**63, "must be a JSON integer from 0 to 9223372036854775807"),
    ("version", "3", "must be a JSON integer from 0 to 9223372036854775807"),
]


@pytest.mark.parametrize(("path", "value", "expected"), INVALID_FIELDS)
def test_field_that_breaks_its_rule_is_invalid_and_named(path, value, expected):
    reason = reason_of(KEY, json.dumps(with_field(path, value)).encode())

    assert reason.startswith(f"{path}: {expected}")


def test_version_written_as_3_point_0_is_invalid_though_equal_to_3():
    raw = CONTRACT_EXAMPLE.replace(b'"version": 3', b'"version": 3.0')

    assert reason_of(KEY, raw).startswith("version: must be a JSON integer")


def test_version_in_exponent_notation_is_invalid():
    raw = CONTRACT_EXAMPLE.replace(b'"version": 3', b'"version": 3e0')

    assert reason_of(KEY, raw).startswith("version: must be a JSON integer")


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("interval_seconds", 0.05),
        ("interval_seconds", 86400),
        ("source.timeout_seconds", 0.1),
        ("source.timeout_seconds", 300),
        ("version", 0),
        ("version", 2**63 - 1),
        ("channel_id", "c" * 200),
        ("product_id", "p"),
        ("source.url", "http://orders.example.com"),
        ("source.url", "HTTPS://orders.example.com/v1?x=1#top"),
        ("source.url", "https://127.0.0.1:8443/orders"),
        ("source.url", "https://[::1]:8443/orders"),
        ("source.url", "https://h.example/" + "p" * 2030),
        ("source.auth.type", "basic"),
        ("source.auth.secret", "s" * 200),
        ("source.auth.secret", "shop..42-token"),
    ],
)
def test_value_at_the_edge_of_its_rule_is_valid(path, value):
    config = decode(with_field(path, value))

    assert isinstance(config, Config)


def test_every_problem_of_a_record_is_reported_in_one_line():
    document = with_field("enabled", 1)
    document["interval_seconds"] = "5"
    document["source"]["type"] = "ftp"

    with pytest.raises(InvalidRecord) as caught:
        decode(document)

    assert caught.value.problems == (
        "enabled: must be a JSON boolean (true or false), got 1",
        "interval_seconds: must be a number from 0.05 to 86400, got the string '5'",
        "source.type: 'ftp' is not supported; 'http' is the only type in version 1",
    )
    assert caught.value.reason == "; ".join(caught.value.problems)


def test_long_value_in_a_reason_is_shortened():
    reason = reason_of(KEY, json.dumps(with_field("channel_id", "c" * 5000)).encode())

    assert len(reason) < 200
    assert "(5000 characters)" in reason


# --- reading back and changing --------------------------------------------------------


def test_config_from_json_dict_applies_the_same_rules():
    with pytest.raises(InvalidRecord) as caught:
        config_from_json_dict(with_field("interval_seconds", True))

    assert caught.value.reason.startswith("interval_seconds: must be a number")


def test_config_from_json_dict_checks_the_expected_id():
    with pytest.raises(InvalidRecord) as caught:
        config_from_json_dict(example(), expected_id="other")

    assert caught.value.reason == "id 'shop-42.sku-7' differs from the expected id 'other'"


def test_config_from_json_dict_rejects_a_non_object():
    with pytest.raises(InvalidRecord):
        config_from_json_dict(["not", "a", "config"])  # type: ignore[arg-type]


def test_with_changes_returns_a_changed_validated_copy():
    disabled = EXAMPLE_CONFIG.with_changes(enabled=False, version=4)

    assert disabled.enabled is False
    assert disabled.version == 4
    assert disabled.channel_id == EXAMPLE_CONFIG.channel_id
    assert EXAMPLE_CONFIG.enabled is True


def test_with_changes_rejects_a_change_that_breaks_a_rule():
    with pytest.raises(InvalidRecord) as caught:
        EXAMPLE_CONFIG.with_changes(interval_seconds=0)

    assert caught.value.reason.startswith("interval_seconds:")


# --- documents for the command line ---------------------------------------------------


def test_check_document_accepts_one_object():
    assert check_document(CONTRACT_EXAMPLE) == ([EXAMPLE_CONFIG], [])


def test_check_document_accepts_an_array_of_objects():
    other = with_field("id", "shop-42.sku-8")

    configs, problems = check_document(json.dumps([example(), other]).encode())

    assert problems == []
    assert [config.id for config in configs] == ["shop-42.sku-7", "shop-42.sku-8"]


def test_check_document_prefixes_each_problem_with_where_it_is():
    entries = [example(), with_field("id", "b"), with_field("id", "c")]
    entries[2]["interval_seconds"] = 0
    entries[1]["enabled"] = "yes"

    _, problems = check_document(json.dumps(entries).encode())

    assert problems == [
        "[1] b: enabled: must be a JSON boolean (true or false), got the string 'yes'",
        "[2] c: interval_seconds: must be a number from 0.05 to 86400, got 0",
    ]


def test_check_document_reports_duplicate_ids():
    configs, problems = check_document(json.dumps([example(), example()]).encode())

    assert problems == [
        "[1] shop-42.sku-7: id 'shop-42.sku-7' is also used by [0]; "
        "a document may hold each config once"
    ]
    assert len(configs) == 1


def test_check_document_names_an_entry_without_a_valid_id_by_index():
    _, problems = check_document(json.dumps([without_field("id"), 3]).encode())

    assert problems == [
        "[0]: id: is missing; it must be 1 to 200 characters of A-Z a-z 0-9 . _ : -",
        "[1]: must be a JSON object, got 3",
    ]


def test_check_document_names_a_lone_object_by_its_id():
    _, problems = check_document(json.dumps(with_field("enabled", 1)).encode())

    assert problems == ["shop-42.sku-7: enabled: must be a JSON boolean (true or false), got 1"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"", "document is empty"),
        (b"[]", "document is an empty JSON array; it holds no config"),
        (b"7", "document must be one JSON object or a JSON array of objects, got 7"),
        (b"[{} {}]", "document is not valid JSON"),
        (b'[{"a": 1, "a": 2}]', "document: duplicate key 'a' in JSON object"),
        (b"\xff", "document is not valid UTF-8"),
    ],
)
def test_check_document_reports_a_document_that_is_not_configs(text, expected):
    configs, problems = check_document(text)

    assert configs == []
    assert len(problems) == 1
    assert problems[0].startswith(expected)


# --- the JSON Schema agrees with the validator ----------------------------------------

_ANNOTATIONS = {"$schema", "title", "description", "default", "format"}
_ASSERTIONS = {"type", "properties", "required", "minimum", "maximum", "minLength",
               "maxLength", "pattern", "const", "enum"}


def schema_accepts(schema: dict[str, Any], value: Any) -> bool:
    """A small evaluator of exactly the keywords the config schema uses."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_is_json_type(value, name) for name in names):
            return False
    if "const" in schema and not _json_equal(value, schema["const"]):
        return False
    if "enum" in schema and not any(_json_equal(value, item) for item in schema["enum"]):
        return False

    if isinstance(value, dict):
        if any(name not in value for name in schema.get("required", [])):
            return False
        for name, subschema in schema.get("properties", {}).items():
            if name in value and not schema_accepts(subschema, value[name]):
                return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            return False
        if "maximum" in schema and value > schema["maximum"]:
            return False
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            return False
        if len(value) > schema.get("maxLength", math.inf):
            return False
        # JSON Schema patterns are ECMA-262, where "$" matches only at the very end;
        # Python's "$" would also match before a final newline.
        pattern = schema.get("pattern", "").replace("$", r"\Z")
        if pattern and not re.search(pattern, value):
            return False
    return True


def _is_json_type(value: Any, name: str) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "null": value is None,
        "number": number,
        # JSON Schema counts 3.0 as an integer; the validator does not (see below).
        "integer": number and float(value).is_integer(),
    }[name]


def _json_equal(left: Any, right: Any) -> bool:
    return type(left) is type(right) and left == right


def _keywords(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for subschema in schema.get("properties", {}).values():
        found |= _keywords(subschema)
    return found


def validator_accepts(document: dict[str, Any]) -> bool:
    try:
        config_from_json_dict(document)
    except InvalidRecord:
        return False
    return True


def test_schema_is_draft_2020_12_and_uses_only_keywords_the_test_evaluates():
    schema = config_json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert _keywords(schema) <= _ANNOTATIONS | _ASSERTIONS
    json.dumps(schema)  # printable as JSON


def test_schema_accepts_the_contract_example():
    assert schema_accepts(config_json_schema(), example())


# Rules JSON Schema cannot express; the schema's descriptions state them in words.
BEYOND_JSON_SCHEMA = [
    ("version", 3.0),  # to JSON Schema, 3.0 is an integer
    ("channel_id", "a\ud800"),
    ("source.url", "http://orders.example.com:99999/"),
    ("source.url", "http://[::1/"),
]


@pytest.mark.parametrize(
    ("path", "value"),
    [(path, value) for path, value, _ in INVALID_FIELDS if (path, value) not in BEYOND_JSON_SCHEMA],
)
def test_schema_rejects_what_the_validator_rejects(path, value):
    document = with_field(path, value)

    assert not validator_accepts(document)
    assert not schema_accepts(config_json_schema(), document)


@pytest.mark.parametrize(("path", "value"), BEYOND_JSON_SCHEMA)
def test_schema_is_looser_only_where_json_schema_cannot_state_the_rule(path, value):
    document = with_field(path, value)

    assert not validator_accepts(document)
    assert schema_accepts(config_json_schema(), document)


@pytest.mark.parametrize(
    "path",
    ["id", "enabled", "channel_id", "product_id", "interval_seconds", "source", "source.type",
     "source.url", "source.auth.type", "source.auth.secret"],
)
def test_schema_requires_what_the_validator_requires(path):
    document = without_field(path)

    assert not validator_accepts(document)
    assert not schema_accepts(config_json_schema(), document)


@pytest.mark.parametrize(
    "document",
    [
        without_field("version"),
        without_field("source.auth"),
        without_field("source.timeout_seconds"),
        with_field("version", None),
        with_field("unknown", {"x": 1}),
        with_field("interval_seconds", 0.05),
        with_field("source.url", "HTTP://h"),
    ],
)
def test_schema_accepts_what_the_validator_accepts(document):
    assert validator_accepts(document)
    assert schema_accepts(config_json_schema(), document)


# --- properties -----------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

FIELD_PATHS = ["id", "enabled", "channel_id", "product_id", "interval_seconds", "source",
               "source.type", "source.url", "source.timeout_seconds", "source.auth",
               "source.auth.type", "source.auth.secret", "version"]

quick = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def decodes_or_rejects(key: bytes | None, value: bytes | None) -> None:
    try:
        result = decode_config_record(key, value, max_record_bytes=LIMIT)
    except InvalidRecord as invalid:
        assert invalid.reason and "\n" not in invalid.reason
        invalid.reason.encode("utf-8")  # goes into a Kafka header
    else:
        assert isinstance(result, (Config, Tombstone))


@quick
@given(key=st.none() | st.binary(max_size=20) | st.just(KEY), value=st.none() | st.binary())
def test_any_bytes_decode_or_raise_invalid_record(key, value):
    decodes_or_rejects(key, value)


@quick
@given(value=json_values)
def test_any_json_decodes_or_raises_invalid_record(value):
    decodes_or_rejects(KEY, json.dumps(value).encode())


@quick
@given(path=st.sampled_from(FIELD_PATHS), value=json_values)
def test_example_with_any_field_replaced_decodes_or_raises_invalid_record(path, value):
    document = with_field(path, copy.deepcopy(value))

    decodes_or_rejects(KEY, json.dumps(document).encode())
    decodes_or_rejects(KEY, json.dumps(document, ensure_ascii=False).encode("utf-8", "replace"))


storable_text = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
names = st.text(storable_text, min_size=1, max_size=200)
secret_names = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00/"), min_size=1,
    max_size=200,
).filter(lambda name: not name.startswith("."))
# Host names start with a letter here: an all-digit name reads as an IPv4 address.
hosts = st.from_regex(r"[a-z]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z]{2,6}){0,2}", fullmatch=True)
urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}/{path}",
    st.sampled_from(["http", "https"]),
    hosts,
    st.sampled_from(["", ":80", ":8443"]),
    st.from_regex(r"[A-Za-z0-9._~/-]{0,40}", fullmatch=True),
)
configs = st.builds(
    Config,
    id=st.from_regex(r"[A-Za-z0-9._:-]{1,200}", fullmatch=True),
    enabled=st.booleans(),
    channel_id=names,
    product_id=names,
    interval_seconds=st.floats(min_value=0.05, max_value=86400) | st.integers(1, 86400),
    source=st.builds(
        HttpSource,
        url=urls,
        timeout_seconds=st.floats(min_value=0.1, max_value=300),
        auth=st.none() | st.builds(SourceAuth, type=st.sampled_from(["bearer", "basic"]),
                                   secret=secret_names),
    ),
    version=st.none() | st.integers(0, 2**63 - 1),
)


@quick
@given(config=configs)
def test_valid_config_round_trips_through_its_record_bytes(config):
    decoded = decode_config_record(
        config.id.encode(), config.to_json_bytes(), max_record_bytes=LIMIT
    )

    assert decoded == config
    assert decoded.normalised() == config.normalised()
    assert decoded.to_json_bytes() == decode_config_record(
        config.id.encode(), decoded.to_json_bytes(), max_record_bytes=LIMIT
    ).to_json_bytes()


@quick
@given(config=configs)
def test_schema_accepts_every_valid_config(config):
    assert schema_accepts(config_json_schema(), config.to_json_dict())


def test_a_url_with_a_user_and_password_is_refused_without_repeating_them() -> None:
    from streams.configs import InvalidRecord, decode_config_record
    import json as _json

    doc = {"id": "a", "enabled": True, "channel_id": "c", "product_id": "p",
           "interval_seconds": 5, "source": {"type": "http", "url": "https://u:hunter2@h/o"}}
    with pytest.raises(InvalidRecord) as caught:
        decode_config_record(b"a", _json.dumps(doc).encode(), max_record_bytes=65536)
    assert "source.url" in caught.value.reason
    assert "hunter2" not in caught.value.reason


# --- hostile shapes -------------------------------------------------------------------

def example_bytes(**replace: str) -> bytes:
    """The example config as JSON text, with raw JSON text put in for some fields."""
    document = with_field("id", KEY.decode())
    text = json.dumps(document)
    for name, raw in replace.items():
        text = text.replace(f'"{name}": {json.dumps(document[name])}', f'"{name}": {raw}', 1)
    return text.encode()


@pytest.mark.parametrize("depth", [100, 1_000, 100_000])
def test_deep_nesting_is_refused_with_a_reason(depth):
    nested = "[" * depth + "]" * depth
    decodes_or_rejects(KEY, example_bytes(channel_id=nested))
    decodes_or_rejects(KEY, ("{" + '"a":' * 0 + nested + "}").encode())
    with pytest.raises(InvalidRecord):
        decode_config_record(KEY, example_bytes(channel_id=nested), max_record_bytes=LIMIT)


def test_a_huge_string_is_refused_by_the_field_rule_not_by_a_crash():
    huge = json.dumps("x" * 500_000)
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, example_bytes(channel_id=huge), max_record_bytes=2_000_000)
    assert "channel_id" in refused.value.reason


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_nan_infinities_and_numbers_beyond_a_double_are_refused(literal):
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, example_bytes(interval_seconds=literal),
                             max_record_bytes=LIMIT)
    reason = refused.value.reason
    assert any(word in reason for word in ("interval_seconds", "NaN", "Infinity", "too large"))


@pytest.mark.parametrize("literal", ["9223372036854775808", "-1", "1e3", "3.0",
                                     "1" + "0" * 5000])
def test_versions_out_of_range_or_not_integers_are_refused(literal):
    raw = example_bytes()[:-1] + f', "version": {literal}}}'.encode()
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, raw, max_record_bytes=LIMIT)
    assert "version" in refused.value.reason or "too long" in refused.value.reason


@pytest.mark.parametrize("raw", [
    b'{"id": "a", "id": "a"}',
    b'{"id": "K", "enabled": true, "enabled": false}',
    b'{"source": {"type": "http", "type": "http"}}',
])
def test_duplicate_keys_at_any_level_are_refused(raw):
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, raw, max_record_bytes=LIMIT)
    assert "duplicate" in refused.value.reason.lower()


@quick
@given(position=st.integers(min_value=0), junk=st.sampled_from(
    [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]))
def test_invalid_utf8_anywhere_is_refused_with_a_reason(position, junk):
    raw = example_bytes()
    at = position % (len(raw) + 1)
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, raw[:at] + junk + raw[at:], max_record_bytes=LIMIT)
    assert refused.value.reason and "\n" not in refused.value.reason


def test_a_record_over_the_size_limit_is_refused_before_it_is_parsed():
    not_even_json = b"\xff{" * (LIMIT // 2 + 1)
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, not_even_json, max_record_bytes=LIMIT)
    assert str(LIMIT) in refused.value.reason and "JSON" not in refused.value.reason


@pytest.mark.parametrize("url", [
    "http://" + "a" * 300 + "/",
    "http://" + "a" * 64 + ".example.com/",
    "http://2852039166/",
    "http://0251.0376.0251.0376/",
    "http://169.254.43518/",
    "http://127.1:8080/",
    "http://0x7f.0.0.1/",
])
def test_a_url_whose_host_no_request_could_reach_is_refused(url):
    with pytest.raises(InvalidRecord) as refused:
        decode_config_record(KEY, json.dumps(with_field("source.url", url)).encode(),
                             max_record_bytes=LIMIT)
    assert refused.value.reason.startswith("source.url: ")
    assert "host" in refused.value.reason


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/o", "http://[::1]/o",
                                 "https://orders.example.com/v1", "http://localhost/o",
                                 "http://bücher.example/o"])
def test_usual_hosts_are_accepted(url):
    config = decode_config_record(KEY, json.dumps(with_field("source.url", url)).encode(),
                                  max_record_bytes=LIMIT)
    assert config.source.url == url
