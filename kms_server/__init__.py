"""kms-server: a clustered KMIP key manager."""

from kmip_core import __version__

__all__ = ["__version__"]
