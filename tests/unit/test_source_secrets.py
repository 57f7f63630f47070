"""Credentials of `source.auth`: read from RECONCILER_SECRETS_DIR, cached until their file
changes, and never repeated in any text the product writes."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from reconciler.source import (
    PullFailed,
    SecretFiles,
    _authorization,
    _refuse_echoed_secret,
    _secret_pieces,
    shown,
)

TOKEN = "tok-5e3a9d1c7b"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "shop-token").write_text(TOKEN + "\n")
    return tmp_path


def reason(call) -> str:
    with pytest.raises(PullFailed) as raised:
        call()
    return str(raised.value)


def test_a_secret_is_read_without_surrounding_whitespace(folder):
    assert SecretFiles(folder).read("shop-token") == TOKEN


def test_an_unchanged_secret_is_not_read_again(folder, monkeypatch):
    secrets = SecretFiles(folder)
    secrets.read("shop-token")
    reads = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or original(self))

    for _ in range(5):
        assert secrets.read("shop-token") == TOKEN

    assert reads == []


def test_a_rotated_secret_is_read_again_even_at_the_same_size_and_time(folder):
    secrets = SecretFiles(folder)
    path = folder / "shop-token"
    before = path.stat()
    secrets.read("shop-token")

    # A rotation by rename, as a mounted secret folder does it: a new inode.
    replacement = folder / "new"
    replacement.write_text(TOKEN.upper() + "\n")
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    replacement.replace(path)

    assert secrets.read("shop-token") == TOKEN.upper()


def test_a_secret_rewritten_in_place_is_read_again(folder):
    secrets = SecretFiles(folder)
    secrets.read("shop-token")
    path = folder / "shop-token"
    stamp = path.stat().st_mtime_ns

    path.write_text("tok-rotated-and-longer\n")
    os.utime(path, ns=(stamp + 1_000_000, stamp + 1_000_000))

    assert secrets.read("shop-token") == "tok-rotated-and-longer"


def test_a_missing_secret_is_a_failed_pull_naming_it(folder):
    text = reason(lambda: SecretFiles(folder).read("shop-43-token"))

    assert text == (f"secret 'shop-43-token' is missing: there is no file 'shop-43-token' in "
                    f"RECONCILER_SECRETS_DIR ({folder})")


def test_a_secret_that_disappears_is_missing_again_not_served_from_the_cache(folder):
    secrets = SecretFiles(folder)
    secrets.read("shop-token")
    (folder / "shop-token").unlink()

    assert "secret 'shop-token' is missing" in reason(lambda: secrets.read("shop-token"))


def test_a_secret_without_a_folder_says_the_setting_is_missing():
    assert reason(lambda: SecretFiles(None).read("shop-token")) == (
        "source.auth names secret 'shop-token', but RECONCILER_SECRETS_DIR is not set")


@pytest.mark.parametrize("content, problem", [
    (b"\n  \n", "secret 'bad' is an empty file"),
    (b"tok-1\nX-Injected: yes", "secret 'bad' holds a line break or another control character"),
    (b"tok\x00-1", "secret 'bad' holds a line break or another control character"),
    (b"tok-\xff\xfe-1", "secret 'bad' is not UTF-8 text"),
])
def test_a_secret_that_cannot_go_into_a_header_is_refused_without_quoting_it(
        tmp_path, content, problem):
    (tmp_path / "bad").write_bytes(content)

    text = reason(lambda: SecretFiles(tmp_path).read("bad"))

    assert text.startswith(problem)
    assert "tok" not in text


def test_bearer_and_basic_headers():
    assert _authorization("bearer", "t", TOKEN) == f"Bearer {TOKEN}"
    assert _authorization("basic", "b", "shop:pa:ss wörd") == (
        "Basic " + base64.b64encode("shop:pa:ss wörd".encode()).decode())


def test_a_basic_secret_without_a_colon_is_refused_without_quoting_it():
    text = reason(lambda: _authorization("basic", "shop-basic", "justapassword"))

    assert text == "secret 'shop-basic' is for basic auth and must hold user:password"


def test_scrub_hides_the_secret_the_password_and_the_header_form(tmp_path):
    (tmp_path / "basic").write_text("shop-user:pw-9f8e7d6c")
    secrets = SecretFiles(tmp_path)
    secrets.read("basic")
    encoded = base64.b64encode(b"shop-user:pw-9f8e7d6c").decode()

    text = secrets.scrub(f"to http://x/?a=shop-user:pw-9f8e7d6c&b=pw-9f8e7d6c&c={encoded}")

    assert text == "to http://x/?a=***&b=***&c=***"


def test_shown_text_is_one_printable_bounded_line():
    text = shown("line one\r\n\tline\x00two" + "x" * 500)

    assert text.startswith("line one line two")
    assert len(text) == 200 and text.endswith("…")


def test_shown_text_scrubs_a_secret_the_bound_would_cut(folder):
    secrets = SecretFiles(folder)
    secrets.read("shop-token")

    text = shown("p" * 190 + TOKEN, scrub=secrets.scrub)

    assert text == "p" * 190 + "***"


def test_shown_text_scrubs_a_secret_that_making_it_printable_would_form(tmp_path):
    # A tab becomes a space: text that was not the secret before is the secret after.
    (tmp_path / "basic").write_text("shop:pw two-9f8e7d")
    secrets = SecretFiles(tmp_path)
    secrets.read("basic")

    text = shown("redirect to /x?p=pw\ttwo-9f8e7d", scrub=secrets.scrub)

    assert text == "redirect to /x?p=***"


def test_an_answer_that_carries_the_secret_back_is_refused():
    pieces = _secret_pieces("bearer", TOKEN)

    text = reason(lambda: _refuse_echoed_secret(
        b'{"orders": [{"id": "1", "echo": "' + TOKEN.encode() + b'"}], "next_cursor": "c"}',
        pieces, "shop-token"))

    assert text == ("source's answer holds the value of secret 'shop-token' that was sent with "
                    "the request; nothing of it is published")
    assert TOKEN not in text


def test_an_answer_with_the_basic_header_form_or_password_is_refused():
    pieces = _secret_pieces("basic", "shop-user:pw-9f8e7d6c")
    encoded = base64.b64encode(b"shop-user:pw-9f8e7d6c")

    for body in (b'{"x": "' + encoded + b'"}', b'{"x": "pw-9f8e7d6c"}'):
        with pytest.raises(PullFailed):
            _refuse_echoed_secret(body, pieces, "basic")
    _refuse_echoed_secret(b'{"orders": [], "next_cursor": "shop-user"}', pieces, "basic")


def test_pieces_too_short_to_be_told_from_ordinary_text_are_not_looked_for():
    assert _secret_pieces("basic", "me:pw") == ("me:pw", "bWU6cHc", "me%3Apw")


def test_encoded_forms_of_a_secret_are_looked_for_too():
    basic = _secret_pieces("basic", "alice:Pa55w0rd-very-secret")
    # The header's base64 without its padding: also found when the `=` is percent-encoded.
    assert "YWxpY2U6UGE1NXcwcmQtdmVyeS1zZWNyZXQ" in basic
    assert "Pa55w0rd-very-secret" in basic
    bearer = _secret_pieces("bearer", "S3cr3tTok3n-XYZ-42")
    assert "QmVhcmVyIFMzY3IzdFRvazNuLVhZWi00Mg" in bearer  # base64 of the header value
    for text in ("http://x/?t=YWxpY2U6UGE1NXcwcmQtdmVyeS1zZWNyZXQ%3D",
                 "token=Bearer%20S3cr3tTok3n-XYZ-42"):
        pieces = basic + bearer
        assert any(piece in text for piece in pieces), text
