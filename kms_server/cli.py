"""`kms-server`: start one KMS node, or check its configuration."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kmip_core import __version__, workers
from kmip_core.service import run_service


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kms-server",
        description="KMIP key server (TTLV over mutual TLS). Flags override the config file, which overrides defaults.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 5696; 0 picks a free port)")
    p.add_argument("--db-url", help="database URL (default sqlite:///<data_dir>/kms.db)")
    p.add_argument("--data-dir", help="directory for the embedded database and trusted client certificates")
    p.add_argument("--tls-cert", metavar="F", help="server certificate (PEM)")
    p.add_argument("--tls-key", metavar="F", help="server private key (PEM)")
    p.add_argument("--tls-ca", metavar="F", help="CA bundle that issues client certificates (PEM)")
    p.add_argument("--master-key-file", metavar="F", help="master key file (kms-admin master-key new)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--audit-web-port", type=int, metavar="PORT", help="port of the audit page (0 picks a free port)")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve /metrics, /healthz and /readyz on this port ([metrics] host, default 127.0.0.1; 0 picks a free port)",
    )
    p.add_argument("--check-config", action="store_true", help="print the effective settings (secrets redacted) and exit")
    p.add_argument("--version", action="version", version=f"kms-server {__version__}")
    return p


def _overrides(args) -> dict:
    return {
        "server": {"host": args.host, "port": args.port, "data_dir": args.data_dir},
        "storage": {"db_url": args.db_url},
        "tls": {"cert": args.tls_cert, "key": args.tls_key, "ca": args.tls_ca},
        "master_key": {"file": args.master_key_file},
        "logging": {"level": args.log_level},
        "audit": {"web_port": args.audit_web_port},
        "metrics": {"port": args.metrics_port},
    }


def _fail(message: str) -> int:
    print(f"kms-server: error: {message}", file=sys.stderr)
    return 2


def server_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kmip_core.config import ConfigError
    from kms_server.config import format_config, load_config

    try:
        cfg = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        return _fail(str(exc))

    if args.check_config:
        print(format_config(cfg))
        problems = cfg.check_files()
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        return 2 if problems else 0

    problems = cfg.check_files()
    if problems:
        return _fail(problems[0])

    from kmip_core import logs

    logs.configure(cfg.logging.level, cfg.logging.format, cfg.server.node_name)
    # Migration chatter is not news at every start.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    slot = workers.worker_slot()
    if slot is None and cfg.server.processes > 1:
        return _supervise(cfg)
    if slot is not None:
        workers.stop_with_parent()
    from twisted.internet import reactor

    from kms_server import server

    try:
        root = server.build(cfg, reactor, slot)
    except Exception as exc:  # Start-up failures are configuration problems.
        message = _start_error(exc)
        if slot is not None:  # The supervisor prints it, once for the node.
            workers.report_failed(slot, message)
            return 2
        return _fail(message)

    if slot is None:
        failed = run_service(root, reactor, _start_error)
    else:
        failed = run_service(
            root,
            reactor,
            _start_error,
            started=lambda: workers.report_ready(slot, root.announcements),
            start_failed=lambda message: workers.report_failed(slot, message),
        )
    if failed and slot is not None:
        return 2  # Reported to the supervisor, which prints it.
    return _fail(failed) if failed else 0


def _supervise(cfg) -> int:
    """`[server] processes` workers on one port, sharing its listening socket
    (kmip_core.workers, docs/process-model.md): bind it, start the workers,
    wait until each is ready (or report the first one's failure), then run
    until told to stop."""
    host, port = cfg.server.host, cfg.server.port
    try:
        listener = workers.bind_listener(host, port)
    except OSError as exc:
        return _fail(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or stop the other server"
        )
    bound_host, bound_port = listener.getsockname()[:2]
    # The workers' counters meet in a directory of this node's own
    # (prometheus-client's multi-process mode): worker 0's /metrics serves
    # their sums. Fresh at every start, removed at the end; those a killed
    # supervisor left are removed at the next start of any node.
    from kmip_core.metrics import MULTIPROCESS_ENV, multiprocess_directory

    with multiprocess_directory("kms-server-metrics-") as shared_metrics:
        env = {**os.environ, MULTIPROCESS_ENV: shared_metrics}
        supervisor = workers.Supervisor(
            workers.worker_argv(), listener, cfg.server.processes, name="kms-server worker", env=env
        )
        return _run_supervisor(supervisor, listener, cfg, bound_host, bound_port)


def _run_supervisor(supervisor, listener, cfg, bound_host, bound_port) -> int:
    try:
        announcements = supervisor.start()
    except (workers.StartFailed, KeyboardInterrupt) as exc:
        listener.close()
        supervisor.load.close()
        return _fail(str(exc)) if isinstance(exc, workers.StartFailed) else 1
    print(f"kms-server listening on {bound_host}:{bound_port}", flush=True)
    for text in announcements:
        print(text, flush=True)
    logging.getLogger("kms_server.server").info("%d worker processes serve %s:%s", cfg.server.processes, bound_host, bound_port)
    return supervisor.run()


def _start_error(exc: Exception) -> str:
    from twisted.internet.error import CannotListenError

    if isinstance(exc, CannotListenError):
        return f"cannot listen on {exc.interface}:{exc.port} ({exc.socketError}); choose another --port or stop the other server"
    return str(exc) or exc.__class__.__name__


if __name__ == "__main__":
    sys.exit(server_main())
