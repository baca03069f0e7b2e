"""What the host agent can fail with: one line each, naming the problem and the fix.

`vtpm-host` prints ``vtpm-host: error: <message>`` and exits 2 for every one
of them. No message ever holds a DEK or any of the clear vTPM state.
"""

from __future__ import annotations

__all__ = [
    "AlreadyRunning",
    "BrokerRefused",
    "BrokerUnavailable",
    "HostError",
    "NotRunning",
    "NvramRefused",
    "RollbackRefused",
    "SwtpmFailed",
]


class HostError(Exception):
    """A host agent command that cannot be carried out."""


class BrokerRefused(HostError):
    """The broker said no: host not registered, VM not placed here, instance revoked."""


class BrokerUnavailable(HostError):
    """The broker's gateway or API did not answer."""


class NvramRefused(HostError):
    """The .nvram is corrupt, truncated, sealed under another key or for another VM, or missing."""


class RollbackRefused(NvramRefused):
    """The .nvram is older than the generation the broker last saw."""


class SwtpmFailed(HostError):
    """swtpm or swtpm_setup failed."""


class AlreadyRunning(HostError):
    """The VM's vTPM already runs on this host."""


class NotRunning(HostError):
    """The VM's vTPM does not run on this host."""
