"""swtpm_setup's create_certs_tool as vtpm-host runs it: a thin client of
the agent's relay (broker/host/ek_relay.py).

swtpm_setup runs its certificate tool three times per new vTPM. This file
is that tool when vtpm-host manufactures: it sends swtpm_setup's arguments to
the relay socket named first on its command line and prints the relay's
answer, which the relay (in the agent's process, with vtpm-ek-certtool's own
code) has already acted on: certificate requested from the broker, checked,
written to --dir. Exit 0, or 1 with one line on stderr (swtpm_setup shows it
and fails).

It is run as `python3 -I -S ek_tool.py SOCKET ARGS...` through a wrapper the
agent writes, so it must stay self-contained and use the standard library
only: no site-packages, no package imports. That keeps each run to a bare
interpreter start instead of loading cryptography and TLS three times per
vTPM.
"""

import json
import socket
import sys

PROG = "vtpm-ek-certtool"
MAX_ANSWER = 64 * 1024
TIMEOUT = 120.0  # the relay's own broker timeout is shorter; this only ends a hung agent


def main(argv: list) -> int:
    if not argv:
        print(f"{PROG}: usage: ek_tool.py RELAY-SOCKET SWTPM_SETUP-ARGUMENTS...", file=sys.stderr)
        return 1
    path, args = argv[0], argv[1:]
    data = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(json.dumps({"argv": args}).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            while len(data) <= MAX_ANSWER:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        print(
            f"{PROG}: cannot reach the host agent at {path} ({exc.strerror or exc}); this tool serves only "
            "swtpm_setup runs that vtpm-host started",
            file=sys.stderr,
        )
        return 1
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("error", answer.get("message")), str):
        print(f"{PROG}: the host agent's answer is not what its relay sends", file=sys.stderr)
        return 1
    if "error" in answer:
        print(f"{PROG}: {' '.join(answer['error'].split())}", file=sys.stderr)
        return 1
    print(answer["message"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
