"""One KMS node: storage, barrier, keystore, dispatcher, worker pool and the
TLS listener, composed as a Twisted service that owns start and stop.

Stopping (SIGTERM) stops accepting connections, lets every request in
flight finish and be answered, closes connections, then releases the
worker pool and the database.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from kms_server import cluster, credentials
from kms_server.config import Config
from kms_server.dispatch.dispatcher import ConnectionInfo, Dispatcher, retry_schedule
from kms_server.keystore.barrier import open_barrier
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.policy import Principal, role_for
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage
from kms_server.wire import tls
from kms_server.wire.protocol import KmipFactory

log = logging.getLogger("kms_server.server")


class KmsService(service.Service):
    def __init__(self, cfg: Config, reactor, announce=None):
        self.cfg = cfg
        self.reactor = reactor
        self.announce = announce or (lambda text: None)
        self.port = None
        self.heartbeat = None
        self.heartbeat_loop = None
        # The data directory holds the embedded database; only this user reads it.
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage = open_storage(cfg.storage.db_url, schema=cfg.storage.schema_mode)
        try:
            barrier = open_barrier(
                self.storage,
                key_file=str(cfg.master_key.file) if cfg.master_key.file else None,
                passphrase_file=str(cfg.master_key.passphrase_file) if cfg.master_key.passphrase_file else None,
            )
        except Exception:
            self.storage.close()
            raise
        self.keystore = Keystore(self.storage, barrier)
        authenticate = None
        if cfg.access.require_credential:
            authenticate = credentials.Authenticator(credentials.load(cfg.access.credentials_file))
        self.dispatcher = Dispatcher(
            self.keystore,
            OPERATIONS,
            node=cfg.server.node_name,
            authenticate=authenticate,
            retry_delays=retry_schedule(cfg.storage.retry_seconds),
        )
        self.context_factory = tls.server_context_factory(cfg.tls)
        self.threadpool = ThreadPool(minthreads=1, maxthreads=cfg.server.worker_threads, name="kms-workers")
        self.factory = KmipFactory(
            handle=self._handle,
            identify=self._identify,
            threadpool=self.threadpool,
            reactor=reactor,
            max_message_size=cfg.server.max_message_size,
            idle_timeout=cfg.server.idle_timeout,
            handshake_timeout=cfg.server.handshake_timeout,
            max_connections=cfg.server.max_connections,
        )

    def _identify(self, certificate, peer: str) -> ConnectionInfo:
        if certificate is None:
            raise ValueError("no client certificate")
        identity = tls.peer_identity(certificate, self.cfg.tls.identity)
        access = self.cfg.access
        role = role_for(identity.name, access.administrators, access.no_crypto_administrators, access.auditors)
        principal = Principal(
            name=identity.name, role=role, subject=identity.subject, fingerprint=identity.fingerprint_sha256
        )
        log.info("connection from %s authenticated as %r (%s)", peer, principal.name, role.value)
        return ConnectionInfo(principal=principal, peer=peer)

    def _handle(self, message: bytes, conn: ConnectionInfo) -> bytes | None:
        return self.dispatcher.handle(message, conn)

    def reload_tls(self) -> None:
        """Re-read the server certificate and the pinned client
        certificates (SIGHUP); new connections use them."""
        try:
            self.context_factory.reload()
            log.info("TLS material reloaded")
        except Exception as exc:
            log.error("TLS reload failed, keeping the previous material: %s", exc)

    def startService(self):
        super().startService()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload_tls))
        self.threadpool.start()
        self.port = self.reactor.listenSSL(
            self.cfg.server.port, self.factory, self.context_factory, interface=self.cfg.server.host
        )
        address = self.port.getHost()
        self.announce(f"kms-server listening on {address.host}:{address.port}")
        engine = getattr(self.storage, "engine", None)
        if engine is not None:
            self.heartbeat = cluster.Heartbeat(engine, self.cfg.server.node_name, f"{address.host}:{address.port}")
            self.heartbeat_loop = task.LoopingCall(
                lambda: deferToThreadPool(self.reactor, self.threadpool, self.heartbeat.beat)
            )
            self.heartbeat_loop.clock = self.reactor
            self.heartbeat_loop.start(cluster.HEARTBEAT_SECONDS, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        log.info("stopping: no new connections; draining requests in flight")
        if self.port is not None:
            yield self.port.stopListening()
        yield self.factory.drain()
        yield self.factory.close_all()
        if self.heartbeat_loop is not None and self.heartbeat_loop.running:
            self.heartbeat_loop.stop()
            yield deferToThreadPool(self.reactor, self.threadpool, self.heartbeat.leave)
        self.threadpool.stop()
        self.storage.close()
        yield super().stopService()
        log.info("stopped")


def build(cfg: Config, reactor) -> service.MultiService:
    root = service.MultiService()

    def announce(text: str) -> None:
        print(text, flush=True)
        sys.stdout.flush()

    KmsService(cfg, reactor, announce).setServiceParent(root)
    return root
