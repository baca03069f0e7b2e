"""The broker's side of key rotation (broker/rotation.py) on a real registry (SQLite) with an in-memory KMS:
the state a rotation keeps, which KEKs a host may unwrap with at each step, resuming, refusing and rolling
back, and a KMS that fails between the switch and the old KEK's revocation."""

from __future__ import annotations

import os

import pytest
from broker_process import csr_pem

from broker.db import Database
from broker.keysafe import KeySafe, format_key_safe
from broker.rotation import Rotation
from broker.trust import Conflict, NotFound, Registry, Unprocessable
from broker.trust_ca import create_trust_ca, fingerprint
from broker.vmkeys import KmsUnavailable

VM = "33333333-3333-4333-8333-333333333333"


def trusted(registry: Registry, name: str) -> None:
    registry.enroll(name, registry.issue_token(name), csr_pem("ignored"))
    registry.approve(name)


class FakeKms:
    """VmKeys' interface over a dict: a key safe's "wrapped" DEK is the DEK itself."""

    provider_name = "kms-test"

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.fail_retire = False

    def _new(self, dek: bytes) -> KeySafe:
        uid = f"kek-{len(self.state) + 1}"
        self.state[uid] = "ACTIVE"
        return KeySafe(self.provider_name, uid, b"\0" * 12, b"\0" * 16, dek)

    def create(self, vm_uuid: str, vm_name: str) -> KeySafe:
        return self._new(os.urandom(64))

    def rewrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> KeySafe:
        return self._new(self.unwrap(key_safe))

    def unwrap(self, key_safe: KeySafe, *, check_only: bool = False) -> bytes:
        if key_safe.kms_key_id not in self.state:
            raise Unprocessable("no such key")
        return b"" if check_only else key_safe.wrapped_dek

    def same_dek(self, a: KeySafe, b: KeySafe) -> bool:
        return self.unwrap(a) == self.unwrap(b)

    def retire(self, uid: str) -> str:
        if self.fail_retire:
            raise KmsUnavailable("the KMS could not deactivate the old KEK: no node answered")
        self.state[uid] = "DEACTIVATED"
        return "deactivated (Revoke, cessation of operation)"


@pytest.fixture
def world(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    db.create_all()
    registry = Registry(db, create_trust_ca("kms-test"))
    trusted(registry, "vc-a")
    trusted(registry, "vc-b")
    host = fingerprint(registry.register_host("vc-a", "esx-1", csr_pem("ignored")))
    kms = FakeKms()
    first = kms.create(VM, "web")
    registry.add_vm("vc-a", VM, "web", first.kms_key_id, format_key_safe(first), "esx-1")
    yield registry, Rotation(registry, kms), kms, host, format_key_safe(first)
    db.close()


def may_unwrap(registry: Registry, host: str, uid: str) -> bool:
    return registry.authorize_unwrap(host, uid).allowed


def trail(registry: Registry) -> list[tuple[str, str, bool]]:
    return [(r.actor, r.action, r.allowed) for r in registry.audit_records() if r.target == VM]


def test_shallow_rotation_unwraps_with_both_keks_until_the_commit_then_only_the_new(world):
    """Begun: the host may unwrap with the old and the pending KEK. Committed with the switched key safe: the
    record names the new KEK, the old one is deactivated and refused to the host; the trail has each step."""
    registry, rotation, kms, host, first = world
    begun = rotation.begin(VM, "shallow", first, "instance:vc-a", "vc-a")
    new = begun["rekey"]["kms_key_id"]
    assert begun["rekey"]["state"] == "pending" and begun["kms_key_id"] == "kek-1"
    assert may_unwrap(registry, host, "kek-1") and may_unwrap(registry, host, new)

    done = rotation.commit(VM, begun["rekey"]["key_safe"], "instance:vc-a", "vc-a")
    assert done["kms_key_id"] == new and done["rekey"] is None and done["retired_kms_key_id"] == "kek-1"
    assert kms.state == {"kek-1": "DEACTIVATED", new: "ACTIVE"}
    assert may_unwrap(registry, host, new) and not may_unwrap(registry, host, "kek-1")
    assert [a for _, a, ok in trail(registry) if ok][-3:] == ["vm.rekey", "vm.rekey", "vm.rekey.retire"]


def test_a_kms_failure_between_the_switch_and_the_revocation_is_finished_by_the_next_commit(world):
    """The KMS fails after the record switched: the answer is 503-worthy (KmsUnavailable), the VM unwraps with
    its new KEK only, the old one is still Active and kept as "retiring"; the next commit (or begin) revokes it."""
    registry, rotation, kms, host, first = world
    begun = rotation.begin(VM, "shallow", first, "instance:vc-a", "vc-a")
    new_safe, new = begun["rekey"]["key_safe"], begun["rekey"]["kms_key_id"]
    kms.fail_retire = True
    with pytest.raises(KmsUnavailable):
        rotation.commit(VM, new_safe, "instance:vc-a", "vc-a")
    vm = registry.get_vm(VM)
    assert (vm.kms_key_id, vm.rekey_state, vm.rekey_kms_key_id) == (new, "retiring", "kek-1")
    assert may_unwrap(registry, host, new) and not may_unwrap(registry, host, "kek-1")
    assert kms.state["kek-1"] == "ACTIVE"

    kms.fail_retire = False
    again = rotation.commit(VM, new_safe, "host:esx-1", None)
    assert again["resumed"] and again["retired_kms_key_id"] == "kek-1" and again["rekey"] is None
    assert kms.state["kek-1"] == "DEACTIVATED"
    assert ("host:esx-1", "vm.rekey.retire", True) in trail(registry)
    # Committed again: done, nothing changes.
    assert rotation.commit(VM, new_safe, "instance:vc-a", "vc-a")["kms_key_id"] == new


def test_begin_again_resumes_the_pending_rotation_and_refuses_another_kind(world):
    """A second begin hands back the pending rotation (no second KEK); a deep begin while a shallow rotation is
    pending, and a key safe that is not the VM's, are Conflicts recorded in the trail."""
    registry, rotation, kms, host, first = world
    one = rotation.begin(VM, "shallow", first, "instance:vc-a", "vc-a")
    two = rotation.begin(VM, "shallow", first, "instance:vc-a", "vc-a")
    assert two["resumed"] and two["rekey"] == one["rekey"] and len(kms.state) == 2
    with pytest.raises(Conflict, match="shallow rekey .* is under way"):
        rotation.begin(VM, "deep", first, "instance:vc-a", "vc-a")
    other = format_key_safe(KeySafe("kms-test", "kek-9", b"\0" * 12, b"\0" * 16, os.urandom(64)))
    with pytest.raises(Conflict, match="not VM"):
        rotation.begin(VM, "shallow", other, "instance:vc-a", "vc-a")
    with pytest.raises(Conflict, match="no rekey pending"):
        rotation.commit(VM, other, "instance:vc-a", "vc-a")
    assert sum(1 for _, a, ok in trail(registry) if a == "vm.rekey" and not ok) == 3


def test_another_instance_may_not_rotate_the_vm(world):
    """vc-b gets NotFound for every step (the VM's existence is not disclosed), audited as its refusal."""
    registry, rotation, kms, host, first = world
    with pytest.raises(NotFound):
        rotation.begin(VM, "shallow", first, "instance:vc-b", "vc-b")
    with pytest.raises(NotFound):
        rotation.commit(VM, first, "instance:vc-b", "vc-b")
    with pytest.raises(NotFound):
        rotation.abort(VM, "instance:vc-b", "vc-b")
    assert [t for t in trail(registry) if t[0] == "instance:vc-b"] == [("instance:vc-b", "vm.rekey", False)] * 3
    assert len(kms.state) == 1


def test_abort_rolls_a_pending_rotation_back(world):
    """Abort: the pending KEK is deactivated and no longer unwraps for the host; the VM keeps its KEK; a deep
    rotation may begin afterwards and gives a new DEK."""
    registry, rotation, kms, host, first = world
    begun = rotation.begin(VM, "shallow", first, "instance:vc-a", "vc-a")
    new = begun["rekey"]["kms_key_id"]
    answer = rotation.abort(VM, "instance:vc-a", "vc-a")
    assert answer["rekey"] is None and answer["kms_key_id"] == "kek-1"
    assert kms.state[new] == "DEACTIVATED" and not may_unwrap(registry, host, new)
    deep = rotation.begin(VM, "deep", first, "instance:vc-a", "vc-a")["rekey"]
    assert deep["kind"] == "deep" and deep["kms_key_id"] not in ("kek-1", new)
