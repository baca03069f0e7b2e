"""Flows that do not pass yet, with the reason (docs/conformance.md lists
the same). The pytest module marks these xfail(strict=True); `make
conformance` says when one starts passing or another stops.

The reasons come from the server's behaviour (runner --in-process gives the
same figures without a server process); a flow that fails for another
reason over TLS is reported by `make conformance` as not known."""

from __future__ import annotations

KNOWN: dict[str, str] = {
    'TL-M-3-14': (
        'error in the test case: its full attribute list (Get Attributes without names) leaves out Sensitive, Always Sensitive, Extractable and Never Extractable, which SKFF-M-9 to 12-14 and SKLC-O-1-14 expect on the same kind of key'
    ),
    'CS-RNG-O-2-14': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'CS-RNG-O-3-14': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'CS-RNG-O-4-14': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'OMOS-O-1-14': (
        'error in the test case: it expects a 1.3 response header to a 1.4 Destroy request'
    ),
    'PKCS11-M-1-20': (
        'PKCS#11 operation: not supported (and PyKMIP defines none of its enumerations)'
    ),
    'CS-RNG-O-2-20': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'CS-RNG-O-3-20': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'CS-RNG-O-4-20': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'BL-M-12-21': (
        'DSA keys (Transparent DSA Public/Private Key): not supported; the test case registers a 512-bit DSA key, which cryptography refuses to load (it takes 1024 bits and more)'
    ),
    'BL-M-13-21': (
        'DSA keys (Transparent DSA Public/Private Key): not supported; the test case registers a 512-bit DSA key, which cryptography refuses to load (it takes 1024 bits and more)'
    ),
    'PKCS11-M-1-21': (
        'PKCS#11 operation: not supported (and PyKMIP defines none of its enumerations)'
    ),
    'CS-RNG-O-2-21': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'CS-RNG-O-3-21': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
    'CS-RNG-O-4-21': (
        'RNG Seed: the optional flows CS-RNG-O-1 to 4 send the same seed and expect four different answers (all 32 bytes taken, 16, none, refused): a server passes one of them; this one takes the whole seed (O-1)'
    ),
}


def reason_for(name: str) -> str:
    return KNOWN.get(name, "")
