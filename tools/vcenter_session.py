#!/usr/bin/env python3
"""Replay a captured vCenter 7.0.3 KMIP session against a running kms-server:
the health probes, Query, a key for a VM ("test01") and one for a host,
tagged with AddAttribute batches (x-Name, x-Identifier, x-Component...),
then Get, GetAttributes and Activate, byte for byte as vCenter sent them
(the session's unique identifiers "1" and "2" are replaced with the ones
this server returns).

    tools/vcenter_session.py [--config etc/kms-dev.toml] [--host H] [--port P]
        [--cert certs/dev/vcenter.pem] [--key certs/dev/vcenter.key] [--ca certs/dev/ca.pem]

The host and port are the [server] ones of --config (a kms-server
configuration), unless --host / --port say otherwise; without either,
127.0.0.1:5696. `make vcenter-session [CONFIG=F] [PORT=P]` runs it against
`make run`'s node; then
`kms-admin audit show --config etc/kms-dev.toml --vm test01` lists what the
session did to the VM's key.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kmip.core.enums import Operation, ResultStatus, Tags  # noqa: E402

from kmip_core import ttlv  # noqa: E402

T = Tags
REQUESTS = ROOT / "tools" / "vectors" / "vcenter-7.0.3-requests.hex"


def _recv_exact(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    return data


def _rewrite(item: ttlv.Item, mapping: dict[str, str]) -> ttlv.Item:
    if item.tag == T.UNIQUE_IDENTIFIER.value and item.value in mapping:
        return ttlv.Item(item.tag, item.type, mapping[item.value])
    if item.type == ttlv.ItemType.STRUCTURE:
        return ttlv.Item(item.tag, item.type, tuple(_rewrite(c, mapping) for c in item.value))
    return item


def _address(args: argparse.Namespace) -> tuple[str, int]:
    """--host/--port, else the configuration's [server] host and port."""
    host, port = "127.0.0.1", 5696
    if args.config:
        from kmip_core.config import ConfigError
        from kms_server.config import load_config

        try:
            cfg = load_config(args.config, {})
        except ConfigError as exc:
            raise ValueError(f"{args.config}: {exc}; fix it or pass --host/--port") from None
        host, port = cfg.server.host, cfg.server.port
        if args.port is None and port == 0:
            raise ValueError(
                f"{args.config} lets kms-server pick a free port; pass the one it printed "
                "('kms-server listening on HOST:PORT'): make vcenter-session PORT=P"
            )
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return (args.host or host), (args.port if args.port is not None else port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", metavar="FILE", help="kms-server configuration whose [server] host and port to use")
    p.add_argument("--host", help="the KMS's address (default: --config's, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="the KMS's KMIP port (default: --config's, else 5696)")
    p.add_argument("--cert", default=str(ROOT / "certs/dev/vcenter.pem"), help="client certificate (PEM)")
    p.add_argument("--key", default=str(ROOT / "certs/dev/vcenter.key"), help="client private key (PEM)")
    p.add_argument("--ca", default=str(ROOT / "certs/dev/ca.pem"), help="CA that issued the server certificate")
    p.add_argument("--server-name", default="localhost", help="name to check the server certificate against")
    args = p.parse_args(argv)
    try:
        args.host, args.port = _address(args)
    except ValueError as exc:
        print(f"vcenter_session: {exc}", file=sys.stderr)
        return 2

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(args.ca)
        context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        print(f"vcenter_session: cannot load the TLS files ({exc}); run 'make run' first or pass --cert/--key/--ca",
              file=sys.stderr)
        return 2
    requests = [line for line in REQUESTS.read_text().splitlines() if line and not line.startswith("#")]
    mapping: dict[str, str] = {}
    creates = failed = 0
    try:
        raw = socket.create_connection((args.host, args.port), timeout=15)
    except OSError as exc:
        print(f"vcenter_session: cannot reach {args.host}:{args.port} ({exc.strerror}); is the server running?",
              file=sys.stderr)
        return 2
    with context.wrap_socket(raw, server_hostname=args.server_name) as sock:
        for hex_request in requests:
            request = _rewrite(ttlv.decode(bytes.fromhex(hex_request)), mapping)
            sock.sendall(ttlv.encode(request))
            header = _recv_exact(sock, 8)
            response = ttlv.decode(header + _recv_exact(sock, struct.unpack(">I", header[4:])[0]))
            for item in response.find_all(T.BATCH_ITEM.value):
                operation = Operation(item.get(T.OPERATION.value))
                status = ResultStatus(item.get(T.RESULT_STATUS.value))
                if status != ResultStatus.SUCCESS:
                    failed += 1
                    print(f"{operation.name}: {status.name} {item.get(T.RESULT_MESSAGE.value)}")
                    continue
                payload = item.find(T.RESPONSE_PAYLOAD.value)
                uid = payload.get(T.UNIQUE_IDENTIFIER.value) if payload is not None else None
                if operation == Operation.CREATE:
                    creates += 1
                    mapping[str(creates)] = uid
                    print(f"CREATE -> {uid}  (vCenter's key \"{creates}\")")
                else:
                    print(f"{operation.name}{f' {uid}' if uid else ''}: SUCCESS")
    print(f"{len(requests)} requests replayed, {failed} items failed; keys: {mapping}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
