"""The OASIS KMIP 1.4 mandatory profile test flows (../shared/vectors/oasis/)
against one real kms-server over mutual TLS: each flow is one case, every
request of the file is sent and every response compared with the expected
one (see conformance/compare.py for what is compared how).

Flows listed in conformance/known.py do not pass yet and are xfail(strict):
a regression fails, and so does a flow that starts passing unnoticed.
`make conformance` runs the 2.0 and 2.1 sets and the optional flows too."""

from __future__ import annotations

import pytest
from conformance import runner
from conformance.known import KNOWN
from conftest import start_server

FLOWS = runner.flows(versions=("1.4",), kinds=("mandatory",))


def _param(flow: runner.Flow):
    marks = []
    if flow.name in KNOWN:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN[flow.name]))
    return pytest.param(flow, id=flow.name, marks=marks)


@pytest.fixture(scope="module")
def conformance_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("conformance")
    pki = runner.FlowPki(directory / "pki")
    server = start_server(directory / "node", pki.directory, log_level="WARNING")
    yield server, pki
    server.stop()


def test_the_mandatory_1_4_vectors_are_there():
    """Without the vectors the flows below would silently not run: a
    regression must not pass CI that way."""
    assert len(FLOWS) == 68, (
        f"expected the 68 mandatory KMIP 1.4 flows in {runner.VECTORS}, found {len(FLOWS)}; "
        "lay ../shared/vectors/oasis beside the checkout or set KMS_OASIS_VECTORS"
    )


@pytest.mark.parametrize("flow", [_param(f) for f in FLOWS])
def test_oasis_flow(conformance_server, flow):
    """The server answers every request of the flow as the profile expects."""
    server, pki = conformance_server
    result = runner.run_flow(flow, server.host, server.port, pki)
    if result.status == "skipped":
        pytest.skip(result.detail)
    assert result.status == "passed", result.detail
