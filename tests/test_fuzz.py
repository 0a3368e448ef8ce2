"""Schemathesis fuzzes a real `openseek serve` on the bundled model from its own OpenAPI schema, in all of its
phases (schema examples, boundary and type coverage, random fuzzing; positive and negative), then with
bench/fuzz_api.py's seeded run: no request may get a 5xx or hang, and afterwards the server answers a greedy
reference completion exactly as before and holds no cache block. Slow (about 3 minutes):
`python -m pytest -m slow tests/test_fuzz.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (hypothesis comes with schemathesis)

from server_util import Server  # noqa: E402

pytestmark = pytest.mark.slow
BENCH = Path(__file__).resolve().parents[1] / "bench"
HANG_S = 30  # seconds without a byte; the capped requests take well under one on the bundled model


@pytest.fixture(scope="module")
def bench():
    """bench/fuzz_api.py and bench/loopback.py, which own the work caps, server limits and reference request."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))
        import fuzz_api
        import loopback
        yield fuzz_api, loopback


@pytest.fixture(scope="module")
def server(bench, tmp_path_factory):
    fuzz_api, loopback = bench
    s = Server(None, tmp_path_factory.mktemp("fuzz") / "server.log", *fuzz_api.SERVER_ARGS, name=None)
    s.reference_before = loopback.reference(s.url)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=30)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error_or_hangs(case, server, bench):
    fuzz_api = bench[0]
    fuzz_api.cap(case)
    response = case.call(base_url=server.url, timeout=HANG_S)  # a hang raises requests' ReadTimeout
    case.validate_response(response, checks=[schemathesis.checks.not_a_server_error])
    assert not fuzz_api.stream_error(response.status_code, response.text), response.text[-500:]


def test_seeded_fuzz_run_finds_no_server_error_hang_or_leak(server, bench):
    """bench/fuzz_api.py's run in two minutes: seeded, so what it finds reproduces (before issue 13's fixes: a
    500 for temperature=1.8e-204, 0 in float32, which sends NaN weights into the sampler)."""
    fuzz_api = bench[0]
    report = fuzz_api.run_all(server.url, examples=500, seconds=120, timeout=HANG_S)
    assert not report.failures(), fuzz_api.render(report, "tests/test_fuzz.py", 120)


def test_server_answers_as_before_and_holds_no_block_after_fuzzing(server, bench):
    loopback = bench[1]
    assert server.proc.poll() is None, server.log.read_text()[-3000:]
    assert loopback.wait_idle(server.url) == {k: 0.0 for k in loopback.GAUGES}
    assert loopback.reference(server.url) == server.reference_before
