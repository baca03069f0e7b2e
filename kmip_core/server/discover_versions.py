"""KMIP 1.4, 4.26 Discover Versions: the versions the server supports, in
order of preference, limited to those the client lists if it lists any."""

from kmip.core.enums import Operation, Tags

from kmip_core import ttlv
from kmip_core.server.context import RequestContext
from kmip_core.server.dispatcher import SUPPORTED_VERSIONS
from kmip_core.ttlv import Item

OPERATION = Operation.DISCOVER_VERSIONS


def _version(major: int, minor: int) -> Item:
    return ttlv.structure(
        Tags.PROTOCOL_VERSION.value,
        [ttlv.integer(Tags.PROTOCOL_VERSION_MAJOR.value, major), ttlv.integer(Tags.PROTOCOL_VERSION_MINOR.value, minor)],
    )


def handle(ctx: RequestContext, keystore: object, payload: Item) -> list[Item]:
    asked = []
    for pv in payload.find_all(Tags.PROTOCOL_VERSION.value):
        asked.append((pv.get(Tags.PROTOCOL_VERSION_MAJOR.value), pv.get(Tags.PROTOCOL_VERSION_MINOR.value)))
    versions = [v for v in SUPPORTED_VERSIONS if not asked or v in asked]
    return [_version(*v) for v in versions]
