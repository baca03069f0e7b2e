#!/usr/bin/env python3
"""The banner `make run` prints before it starts the node: what the
configuration really says, as `kms-server --check-config` reports it
(the same file and flags `make run` passes, so the ports and paths shown are
the ones the node will use).

    tools/run_banner.py KMS_SERVER [kms-server flags: --config FILE --port P ...]
"""

from __future__ import annotations

import subprocess
import sys
import tomllib


def main(argv: list[str]) -> int:
    if not argv:
        print("run_banner: usage: run_banner.py KMS_SERVER [kms-server flags]", file=sys.stderr)
        return 2
    server, flags = argv[0], argv[1:]
    result = subprocess.run([server, *flags, "--check-config"], capture_output=True, text=True, timeout=60)
    try:
        cfg = tomllib.loads(result.stdout)
    except tomllib.TOMLDecodeError:
        cfg = {}
    if "server" not in cfg:
        # kms-server prints the reason itself when make run starts it.
        print(f"(kms-server --check-config failed: {result.stderr.strip() or 'no output'})")
        return 0
    config = next((f for i, f in enumerate(flags) if i and flags[i - 1] == "--config"), "(defaults)")
    server_cfg, tls, audit, metrics = cfg["server"], cfg.get("tls", {}), cfg.get("audit", {}), cfg.get("metrics", {})
    host = server_cfg.get("host", "127.0.0.1")

    def where(port: object, scheme: str = "", host: str = host) -> str:
        if port == 0:
            return f"{scheme}{host}: a free port, printed by kms-server below"
        return f"{scheme}{host}:{port}"

    print("")
    print(f"Starting one KMS node with {config}:")
    print(f"  KMIP (mutual TLS):  {where(server_cfg.get('port'))}")
    print(f"  store:              {cfg.get('storage', {}).get('db_url', '?')}")
    if audit.get("web_port") is not None:
        print(f"  audit page:         {where(audit['web_port'], 'https://', audit.get('web_host', host))}/ "
              "(an administrator's or an auditor's certificate)")
    if metrics.get("port") is not None:
        print(f"  metrics, health:    {where(metrics['port'], 'http://', metrics.get('host', host))}/metrics, /healthz, /readyz")
    print(f"Audit trail: .venv/bin/kms-admin audit show --config {config} (verify, export: see README)")
    print("Connect a KMIP client with mutual TLS:")
    print(f"  CA certificate:     {tls.get('ca', '?')}")
    print("  client certificate: certs/dev/vcenter.pem   key: certs/dev/vcenter.key")
    print("  (administrator:     certs/dev/admin.pem      key: certs/dev/admin.key)")
    print("  (auditor:           certs/dev/auditor.pem    key: certs/dev/auditor.key)")
    print("More clients: .venv/bin/kms-admin pki issue-client --dir certs/dev --name NAME")
    for problem in (line for line in result.stderr.splitlines() if line.startswith("problem:")):
        print(problem)
    print("Stop with Ctrl-C (in-flight requests are drained first).")
    print("", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
