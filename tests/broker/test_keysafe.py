"""The key safe string: format and parse are exact inverses, and anything
else is refused with a one-line reason."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.keysafe import (
    DEK_BYTES,
    IV_BYTES,
    TAG_BYTES,
    KeySafe,
    KeySafeError,
    format_key_safe,
    parse_key_safe,
)

text_field = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=80)
key_safes = st.builds(
    KeySafe,
    provider=text_field,
    kms_key_id=text_field,
    iv=st.binary(min_size=IV_BYTES, max_size=IV_BYTES),
    tag=st.binary(min_size=TAG_BYTES, max_size=TAG_BYTES),
    wrapped_dek=st.binary(min_size=DEK_BYTES, max_size=DEK_BYTES),
)

SAMPLE = KeySafe("kms-prod", "3f2c1a", b"\x01" * 12, b"\x02" * 16, b"\x03" * 64)


@given(key_safes)
def test_parse_inverts_format(ks):
    """Any key safe survives format then parse unchanged."""
    text = format_key_safe(ks)
    assert parse_key_safe(text) == ks
    assert format_key_safe(parse_key_safe(text)) == text


@given(key_safes)
def test_format_uses_only_safe_characters(ks):
    """Percent-encoding keeps the structure characters out of the fields."""
    text = format_key_safe(ks)
    inner = text[len("vtpm:keysafe/1/(pair/(fqid/<VTPM-NULL>/") : -2]
    provider, rest = inner.split("/", 1)
    key_id, algorithm, wrapped = rest.split(",")
    assert algorithm == "AES-256-GCM"
    assert all(c.isascii() and (c.isalnum() or c in "-._~%") for c in provider + key_id)


def test_known_spelling():
    """The documented layout, byte for byte."""
    blob = base64.b64encode(b"\x01" * 12 + b"\x02" * 16 + b"\x03" * 64).decode()
    assert format_key_safe(SAMPLE) == f"vtpm:keysafe/1/(pair/(fqid/<VTPM-NULL>/kms-prod/3f2c1a,AES-256-GCM,{blob}))"
    assert format_key_safe(KeySafe("kms prod/1", "a,b", *([b"\0" * 12, b"\0" * 16, b"\0" * 64]))).startswith(
        "vtpm:keysafe/1/(pair/(fqid/<VTPM-NULL>/kms%20prod%2F1/a%2Cb,"
    )


GOOD = format_key_safe(SAMPLE)
BLOB = GOOD.rsplit(",", 1)[1][:-2]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "must start with"),
        ("vmware:key/list/(pair/(fqid/<VMWARE-NULL>/p/k,HMAC-SHA-256,AA==))", "must start with"),
        (GOOD.replace("keysafe/1/", "keysafe/2/"), "version 2 is not supported"),
        (GOOD.replace("<VTPM-NULL>", "<VMWARE-NULL>"), "fqid must start with"),
        (GOOD.replace("AES-256-GCM", "HMAC-SHA-256"), "algorithm"),
        (GOOD.replace("kms-prod", "kms prod"), "percent-encoded"),
        (GOOD.replace("kms-prod", "kms%2dprod"), "canonical percent-encoding"),
        (GOOD.replace("kms-prod", "%ff"), "not percent-encoded UTF-8"),
        (GOOD.replace("/kms-prod/", "//"), "provider is empty"),
        (GOOD.replace(BLOB, BLOB[:-4]), "must decode to 92 bytes"),
        (GOOD.replace(BLOB, BLOB[:-1] + "!"), "not valid base64"),
        (GOOD.replace(BLOB, BLOB.rstrip("=")), "not valid base64"),
        (GOOD[:-1], "malformed"),
        (GOOD + ")", "malformed"),
        (GOOD + "\n", "malformed"),
        ("vtpm:keysafe/1/" + "x" * 5000, "longer than"),
        (GOOD.replace("3f2c1a", "%0A"), "control characters"),
    ],
)
def test_malformed_refused(text, words):
    """Each kind of damage gets its own clear reason."""
    with pytest.raises(KeySafeError) as info:
        parse_key_safe(text)
    message = str(info.value)
    assert words in message
    assert "\n" not in message


def test_not_a_string_refused():
    with pytest.raises(KeySafeError, match="must be a string"):
        parse_key_safe(b"vtpm:keysafe/1/")


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes(text):
    """Garbage is refused with KeySafeError, never another exception."""
    try:
        parse_key_safe(text)
    except KeySafeError:
        pass


@settings(max_examples=300)
@given(key_safes, st.data())
def test_any_single_character_change_is_refused_or_different(ks, data):
    """Flipping one character never parses back to the same key safe."""
    text = format_key_safe(ks)
    index = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.characters(blacklist_categories=("Cs",)).filter(lambda c: c != text[index]))
    changed = text[:index] + replacement + text[index + 1 :]
    try:
        assert parse_key_safe(changed) != ks
    except KeySafeError:
        pass


def test_constructor_checks_sizes():
    with pytest.raises(KeySafeError, match="wrapped DEK must be 64 bytes"):
        KeySafe("p", "k", b"\0" * 12, b"\0" * 16, b"\0" * 32)
    with pytest.raises(KeySafeError, match="iv must be 12 bytes"):
        KeySafe("p", "k", b"\0" * 16, b"\0" * 16, b"\0" * 64)


def test_repr_shows_no_bytes():
    assert "\\x03" not in repr(SAMPLE) and "bytes[64]" in repr(SAMPLE)
