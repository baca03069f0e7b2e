"""The Unique Identifiers of new objects (kms_server/keystore/uids.py):
version 7 UUIDs, ordered by the millisecond they were made in, random
within it; and what the keystore and the operations give new objects."""

from __future__ import annotations

import os
import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kmip.core.enums import CryptographicAlgorithm, ObjectType

from kmip_core.policy import Principal
from kmip_core.sealing.barrier import Barrier
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import Material
from kms_server.keystore.uids import new_uid
from kms_server.storage import open_storage

MS = st.integers(min_value=0, max_value=(1 << 48) - 1)


def _version7_at(uid: str) -> int:
    """The millisecond a well-formed version 7 UUID names (fails otherwise)."""
    parsed = uuid.UUID(uid)
    assert str(parsed) == uid, "the canonical, lower-case 36-character form"
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    return parsed.int >> 80


@given(MS)
def test_a_uid_is_a_version_7_uuid_of_the_millisecond_it_was_made_in(ms):
    assert _version7_at(new_uid(ms)) == ms


@given(MS, MS)
def test_uids_made_in_later_milliseconds_sort_after(a, b):
    if a == b:
        return
    earlier, later = sorted((a, b))
    assert new_uid(earlier) < new_uid(later)
    assert uuid.UUID(new_uid(earlier)).bytes < uuid.UUID(new_uid(later)).bytes


def test_uids_of_one_millisecond_differ_in_their_74_random_bits():
    uids = [uuid.UUID(new_uid(1_800_000_000_000)).int for _ in range(2000)]
    assert len(set(uids)) == 2000
    random_bits = [(u >> 64) & 0xFFF for u in uids] + [u & ((1 << 62) - 1) for u in uids]
    # rand_a (12 bits) and rand_b (62 bits) both vary: not a counter, not constant.
    assert len({(u >> 64) & 0xFFF for u in uids}) > 1000
    assert len(set(random_bits)) > 3000


def test_a_uid_made_now_names_now():
    before = time.time_ns() // 1_000_000
    ms = _version7_at(new_uid())
    after = time.time_ns() // 1_000_000
    assert before <= ms <= after


@pytest.mark.parametrize("ms", [-1, 1 << 48])
def test_a_time_a_uuid_cannot_hold_is_refused(ms):
    with pytest.raises(ValueError, match="outside what a version 7 UUID holds"):
        new_uid(ms)


def test_new_objects_get_version_7_uids_in_the_order_they_were_made():
    keystore = Keystore(open_storage("memory://"), Barrier(os.urandom(32)))
    attributes = {
        "Cryptographic Algorithm": [attrs.make("Cryptographic Algorithm", CryptographicAlgorithm.AES.value)],
        "Cryptographic Length": [attrs.make("Cryptographic Length", 256)],
    }
    made = []
    for _ in range(3):
        prepared = keystore.prepare_object(
            Principal("alice"), ObjectType.SYMMETRIC_KEY, dict(attributes), Material(os.urandom(32)), 0
        )
        with keystore.transaction() as txn:
            made.append(keystore.store_object(txn, prepared).uid)
        time.sleep(0.002)  # the next one in a later millisecond
    assert [_version7_at(uid) for uid in made] == sorted(_version7_at(uid) for uid in made)
    assert made == sorted(made)
    # A uid the caller gives is kept as given.
    given_uid = "a-name-chosen-by-the-caller"
    prepared = keystore.prepare_object(
        Principal("alice"), ObjectType.SYMMETRIC_KEY, dict(attributes), Material(os.urandom(32)), 0, uid=given_uid
    )
    with keystore.transaction() as txn:
        assert keystore.store_object(txn, prepared).uid == given_uid

