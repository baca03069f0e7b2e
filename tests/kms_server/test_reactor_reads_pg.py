"""A node on PostgreSQL answers reads from its reactor thread, waiting there
for its statements' answers (kms_server/server.py, kmip_core/reactor_io.py):
a Get is answered once the reactor has seen its answer arrive, without the
pool; writes, and a first Get (which clears Fresh), go to the pool at
once; a read that finds no kept connection goes there too.

The node is a real KmsService on this machine's PostgreSQL, its reactor a
Clock that also watches sockets with select()
(tests.twisted_fakes.SelectReactor). The audit trail is off here, so that a
read's answer does not wait for its record (written on a pool thread);
the integration tests run the same paths with the trail on."""

from __future__ import annotations

import pytest
from kmip.core.enums import Operation, ResultStatus
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.protocol import HeldAnswer, InPool
from kms_server.config import load_config
from kms_server.server import KmsService
from kms_server.storage import open_storage
from tests.conftest import write_node_config
from tests.kms_server.dispatch.test_dispatcher import batch_item, only_item, request, status
from tests.kms_server.test_reactor_answers import CONN, create_request, uid_of
from tests.twisted_fakes import SelectReactor


@pytest.fixture
def pg_node(tmp_path, pki_dir, postgres_url):
    config = write_node_config(
        tmp_path / "pg-node", pki_dir, db_url=postgres_url, extra_config="[audit]\nenabled = false\n"
    )
    open_storage(postgres_url).close()  # the schema, as `kms-admin db upgrade` makes it
    reactor = SelectReactor()
    service = KmsService(load_config(config), reactor)
    try:
        yield service, reactor
    finally:
        service.storage.close()


def get_request(uid: str) -> bytes:
    return request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])


def answered(service, reactor, answer) -> bytes:
    """The bytes a connection would send for `answer`, the reactor pumped
    until they are there."""
    if isinstance(answer, bytes):
        return answer
    assert isinstance(answer, HeldAnswer), answer
    got: list = []
    answer.release().addBoth(got.append)
    reactor.pump_until(lambda: got)
    assert isinstance(got[0], bytes), got[0]
    return got[0]


def served_key(service) -> str:
    """A key created and read once, on this thread as on a pool thread (its
    first Get clears Fresh): from now on a Get of it only reads."""
    uid = uid_of(service._handle(create_request(), CONN))
    assert status(only_item(ttlv.decode(service._handle(get_request(uid), CONN)))) == ResultStatus.SUCCESS
    return uid


def test_a_get_on_postgresql_waits_for_its_read_in_the_reactor_and_is_answered_there(pg_node, monkeypatch):
    service, reactor = pg_node
    uid = served_key(service)
    pooled: list = []
    monkeypatch.setattr(service, "_in_pool", lambda in_pool: pooled.append(in_pool))
    answer = service._handle_inline(get_request(uid), CONN)
    assert isinstance(answer, HeldAnswer), "its read waits for the server's answer"
    assert service.reactor_reads.waiting == 1 and reactor.readers
    response = only_item(ttlv.decode(answered(service, reactor, answer)))
    assert status(response) == ResultStatus.SUCCESS
    assert response.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value) == uid
    assert pooled == [] and service.reactor_reads.waiting == 0 and not reactor.readers


def test_writes_and_a_first_get_on_postgresql_go_to_the_pool_without_a_read_in_the_reactor(pg_node, monkeypatch):
    service, _reactor = pg_node
    started: list = []
    start = service.reactor_reads.start
    monkeypatch.setattr(service.reactor_reads, "start", lambda job: started.append(job) or start(job))
    assert isinstance(service._handle_inline(create_request(), CONN), InPool)
    uid = uid_of(service._handle(create_request(), CONN))  # held by this process as Fresh
    assert isinstance(service._handle_inline(get_request(uid), CONN), InPool)
    assert started == [], "neither was tried as a read first"


def test_a_get_that_finds_no_kept_connection_goes_to_the_pool(pg_node):
    service, _reactor = pg_node
    uid = served_key(service)
    while service.storage.idle_readers:  # every kept connection taken
        service.storage._idle_readers.pop()[0].close()
    answer = service._handle_inline(get_request(uid), CONN)
    assert isinstance(answer, InPool)
    assert status(only_item(ttlv.decode(answer.run()))) == ResultStatus.SUCCESS  # as the pool runs it
