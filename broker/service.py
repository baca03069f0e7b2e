"""The broker process: database, master key, trust CA, KMS client, the
management API listener and (through a hook) the host gateway listener, on
one Twisted reactor, composed as a MultiService that owns start and stop.

Start-up refuses, with one line, anything it cannot serve with: a database
it cannot open or whose schema is not this release's (broker.schema), a
master key that does not open it, a missing trust CA (`vtpm-broker init`),
unusable TLS or KMS client files.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from broker import audit_trail, schema
from broker.api import Api, ApiContextFactory, make_site
from broker.config import BrokerConfig
from broker.db import Database, open_barrier
from broker.metrics import BrokerMetrics, MeteredKmipClient, monitor_listener
from broker.trust import Registry
from broker.trust_ca import load_trust_ca
from broker.vmkeys import VmKeys
from broker.vtpm_ca import EK_CA_PURPOSE
from kmip_core.client import KmipClient
from kmip_core.config import TlsConfig
from kmip_core.limits import LimitedFactory, ListenerLimits
from kmip_core.sealing.barrier import Barrier
from kmip_core.tls import reload_on_sighup

__all__ = ["BrokerService", "GatewayFactory", "build", "default_gateway_factory", "ek_ca_issuer"]

log = logging.getLogger("broker.service")

PIN_REFRESH_SECONDS = 2.0

# The gateway hook: (cfg, registry, kms_client, reactor, threadpool) ->
# (protocol factory, TLS context factory), or None for no gateway.
GatewayFactory = Callable[[BrokerConfig, Registry, KmipClient, Any, ThreadPool], tuple[Any, Any]]


def gateway_tls_config(cfg: BrokerConfig) -> TlsConfig:
    """The gateway's TLS settings in the KMS core's terms: the broker's
    server certificate, client certificates from the trust CA only."""
    return TlsConfig(
        cert=cfg.tls.cert,
        key=cfg.tls.key,
        ca=cfg.trust_ca_path,
        trusted_clients_dir=cfg.broker.data_dir / ".no-pinned-clients-dir",
        identity="cn",
        min_version=cfg.tls.min_version,
    )


def default_gateway_factory(cfg, registry, kms_client, reactor, threadpool):
    """broker.gateway's listener, if that module is present."""
    try:
        from broker.gateway import build_gateway_factory
    except ImportError:
        log.warning("broker.gateway is not available: no host gateway listener")
        return None
    return build_gateway_factory(
        gateway_tls_config(cfg),
        registry,
        kms_client,
        reactor,
        threadpool,
        max_message_size=cfg.gateway.max_message_size,
        idle_timeout=cfg.gateway.idle_timeout,
        handshake_timeout=cfg.gateway.handshake_timeout,
        max_connections=cfg.gateway.max_connections,
        max_handshakes=cfg.gateway.max_handshakes,
        frame_timeout=cfg.gateway.frame_timeout,
        metrics=getattr(kms_client, "metrics", None),
    )


def ek_ca_issuer(db: Database, barrier: Barrier):
    """The API's EK issuer: the active EK CA (read per request, so a CA swap
    by `vtpm-broker ca ...` applies at once) and broker.vtpm_ca's handler."""
    from broker import vtpm_ca

    def issue(body, caller_host, authorize):
        row = db.get_ca(EK_CA_PURPOSE)
        if row is None:
            raise vtpm_ca.EkRequestError(
                422, "the broker has no EK CA; run 'vtpm-broker init' or 'vtpm-broker ca import'"
            )
        ca = vtpm_ca.EkCa.from_sealed(barrier, load_ek_blobs(row))
        return vtpm_ca.handle_ek_certificate_request(ca, body, caller_host, authorize=authorize)

    return issue


def load_ek_blobs(row) -> dict[str, bytes]:
    return {
        "key_sealed": row.sealed_key,
        "cert_pem": row.cert_pem.encode("ascii"),
        "chain_pem": (row.chain_pem or "").encode("ascii"),
    }


class BrokerService(service.Service):
    def __init__(self, cfg: BrokerConfig, reactor, announce=None, gateway_factory: GatewayFactory | None = None):
        self.cfg = cfg
        self.reactor = reactor
        self.announce = announce or (lambda text: None)
        cfg.broker.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db = Database(cfg.storage.db_url)
        self.metrics = BrokerMetrics(cfg.broker.node_name)
        try:
            schema.prepare(self.db, cfg.storage.schema_mode)
            self.barrier = open_barrier(self.db, cfg.master_key.file)
            trust_ca = load_trust_ca(self.db, self.barrier)
            # The public trust CA certificate, for the TLS layers and operators.
            cfg.trust_ca_path.write_text(trust_ca.cert_pem)
            self.registry = Registry(
                self.db,
                trust_ca,
                node=cfg.broker.node_name,
                audit_signer=audit_trail.open_signer(self.db, cfg.audit.signing_key_file),
            )
            self.registry.attestation = cfg.attestation.settings()
            if cfg.kms.ca is None:  # check_files refuses it before a run; a service made directly
                raise ValueError('kms.ca is not set; add ca = "<the KMS CA certificate>" to [kms]')
            self.kms_client = MeteredKmipClient(
                list(cfg.kms.nodes),
                cfg.kms.cert,
                cfg.kms.key,
                cfg.kms.ca,
                server_name=cfg.kms.server_name,
                connect_timeout=cfg.kms.connect_timeout,
                request_timeout=cfg.kms.request_timeout,
                connections=cfg.kms.connections,
            )
            self.kms_client.metrics = self.metrics
            self.api = Api(
                cfg,
                self.registry,
                VmKeys(self.kms_client, cfg.broker.provider_name),
                ek_issuer=ek_ca_issuer(self.db, self.barrier),
            )
            self.api.metrics = self.metrics
            self.api_threadpool = ThreadPool(minthreads=1, maxthreads=cfg.api.worker_threads, name="broker-api")
            self.checkpoints = audit_trail.CheckpointLoop(
                self.db, self.registry.audit_signer, cfg.broker.node_name, reactor, self.api_threadpool,
                cfg.audit.checkpoint_seconds,
            )  # fmt: skip
            self.site = make_site(self.api, reactor, self.api_threadpool, cfg.api.max_body)
            # Handshake cap and timeout, connection slots counted after TLS,
            # a deadline for reading each request whole.
            self.api_listener = LimitedFactory(
                self.site,
                ListenerLimits(
                    max_connections=cfg.api.max_connections,
                    max_handshakes=cfg.api.max_handshakes,
                    handshake_timeout=cfg.api.handshake_timeout,
                    request_timeout=cfg.api.request_timeout,
                ),
                reactor,
                name="broker api",
            )
            self.api_tls = ApiContextFactory(cfg, self.registry.pinned_certificates())
            # --- Gateway hook: the host KMIP/TLS listener plugs in here. ---
            self.gateway_threadpool = ThreadPool(
                minthreads=1, maxthreads=cfg.gateway.worker_threads, name="broker-gateway"
            )
            self.gateway = None
            if gateway_factory is not None:
                self.gateway = gateway_factory(cfg, self.registry, self.kms_client, reactor, self.gateway_threadpool)
            # /metrics, /healthz, /readyz ([metrics]); None when off.
            self.monitor = monitor_listener(self, reactor)
        except Exception:
            self.db.close()
            raise
        # Twisted's listening ports (IListeningPort: a zope Interface, whose
        # methods mypy cannot call without a plugin).
        self.api_port: Any = None
        self.gateway_port: Any = None
        self.pin_loop: task.LoopingCall | None = None

    def _refresh_pins(self):
        d = deferToThreadPool(self.reactor, self.api_threadpool, self.registry.pinned_certificates)

        def apply(pins):
            if pins != self.api_tls.pinned:
                self.api_tls.reload(pins)
                log.info("pinned instance certificates changed: %d pinned", len(pins))

        d.addCallback(apply)
        d.addErrback(lambda f: log.warning("could not refresh pinned certificates: %s", f.getErrorMessage()))
        return d

    def startService(self):
        super().startService()
        reload_on_sighup(self.reactor, self.api_tls, log)
        self.api_threadpool.start()
        self.checkpoints.start()
        self.api_port = self.reactor.listenSSL(
            self.cfg.api.port, self.api_listener, self.api_tls, interface=self.cfg.api.host
        )
        address = self.api_port.getHost()
        self.announce(f"vtpm-broker api listening on {address.host}:{address.port}")
        if self.gateway is not None:
            factory, context_factory = self.gateway
            self.gateway_threadpool.start()
            self.gateway_port = self.reactor.listenSSL(
                self.cfg.gateway.port, factory, context_factory, interface=self.cfg.gateway.host
            )
            address = self.gateway_port.getHost()
            self.announce(f"vtpm-broker gateway listening on {address.host}:{address.port}")
        if self.monitor is not None:
            self.monitor.start()
            self.announce(f"vtpm-broker metrics on {self.monitor.url}")
        self.pin_loop = pin_loop = task.LoopingCall(self._refresh_pins)
        pin_loop.clock = self.reactor
        pin_loop.start(PIN_REFRESH_SECONDS, now=False)

    @defer.inlineCallbacks
    def stopService(self):
        log.info("stopping: no new connections; finishing requests in flight")
        if self.pin_loop is not None and self.pin_loop.running:
            self.pin_loop.stop()
        if self.api_port is not None:
            yield self.api_port.stopListening()
        if self.monitor is not None:
            yield self.monitor.stop()
        if self.gateway_port is not None:
            yield self.gateway_port.stopListening()
            assert self.gateway is not None  # its port listens (startService)
            factory = self.gateway[0]
            if hasattr(factory, "drain"):
                yield factory.drain()
            if hasattr(factory, "close_all"):
                yield factory.close_all()
        # A last checkpoint, so that removing the newest records shows.
        yield self.checkpoints.stop()
        if self.gateway_threadpool.started:
            self.gateway_threadpool.stop()
        self.api_threadpool.stop()
        self.kms_client.close()
        self.db.close()
        yield super().stopService()
        log.info("stopped")


def build(cfg: BrokerConfig, reactor, gateway_factory: GatewayFactory | None = None) -> service.MultiService:
    """The broker as a MultiService. ``gateway_factory`` is the hook for the
    host gateway listener (``default_gateway_factory`` uses broker.gateway)."""
    root = service.MultiService()

    def announce(text: str) -> None:
        print(text, flush=True)
        sys.stdout.flush()

    BrokerService(cfg, reactor, announce, gateway_factory).setServiceParent(root)
    return root
