"""Fuzz openseek's HTTP API from its own OpenAPI schema with schemathesis: every operation gets generated requests
that fit the schema (positive) and that break it (negative). A 5xx, a stream that ends in an error event, or a
request that gets no byte for --timeout seconds (a hang) fails the run; so does a server that afterwards answers
a greedy reference completion differently from before, or still holds cache blocks once idle.

    python bench/fuzz_api.py [--examples 500] [--minutes 4] [--timeout 30] [--url URL] [--out FILE]

Without --url it starts `openseek serve` on the bundled model on a free loopback port with small limits, and
writes the table of cases and statuses by operation to bench/results/fuzz_api.txt. Integer fields that set the
amount of work (max_tokens, max_completion_tokens, n) are lowered to CAP before sending: the run looks for
server errors and hangs, not long generations (bench/soak.py sends huge max_tokens). Schema conformance checks
are reported, not failed on. Exit status 1 when the run fails.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

from loopback import ROOT, reference, start_server, stop_server, wait_idle

CAP = {"max_tokens": 8, "max_completion_tokens": 8, "n": 2}
SERVER_ARGS = ["--max-num-seqs", "4", "--max-model-len", "256", "--max-waiting", "16"]
REPORTED_CHECKS = ("status_code_conformance", "content_type_conformance", "response_schema_conformance")


@dataclass
class Report:
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # "op mode" -> status
    server_errors: list[str] = field(default_factory=list)  # curl command and reply of each 5xx
    hangs: list[str] = field(default_factory=list)
    stream_errors: list[str] = field(default_factory=list)  # 200 streams that carried an error event (a 5xx)
    conformance: Counter = field(default_factory=Counter)  # "check op" -> failures
    skipped: list[str] = field(default_factory=list)
    reference_before: str = ""
    reference_after: str = ""
    idle: dict[str, float] = field(default_factory=dict)

    @property
    def cases(self) -> int:
        return sum(sum(c.values()) for c in self.statuses.values())

    def failures(self) -> list[str]:
        out = [f"{len(self.server_errors)} server errors (5xx)"] if self.server_errors else []
        out += [f"{len(self.stream_errors)} streams ending in a server error"] if self.stream_errors else []
        out += [f"{len(self.hangs)} hangs"] if self.hangs else []
        if self.reference_after != self.reference_before:
            out.append(f"reference changed: {self.reference_before!r} -> {self.reference_after!r}")
        if any(self.idle.values()):
            out.append(f"not idle afterwards: {self.idle}")
        return out


class _OutOfTime(Exception):
    pass


def cap(case) -> None:
    """Lower the work-setting integers of a JSON object body to CAP; anything else is sent as generated."""
    if isinstance(case.body, dict):
        for k, limit in CAP.items():
            v = case.body.get(k)
            if type(v) is int and v > limit:
                case.body[k] = limit


def stream_error(status: int, text: str) -> bool:
    """A 200 event stream that carries an error event: the server failed after the stream had started."""
    return status == 200 and text.startswith("data:") and '\ndata: {"error"' in "\n" + text


def send(case, url: str, session: requests.Session, timeout: float, report: Report, label: str) -> None:
    """One case: its status, and what it breaks."""
    from schemathesis import checks
    from schemathesis.errors import FailureGroup

    cap(case)
    try:
        response = case.call(base_url=url, session=session, timeout=timeout)
    except requests.Timeout:
        report.statuses[label]["hang"] += 1
        report.hangs.append(case.as_curl_command())
        return
    except requests.ConnectionError as e:
        report.statuses[label]["no reply"] += 1
        report.server_errors.append(f"{case.as_curl_command()}\n  -> connection error: {e}")
        return
    report.statuses[label][str(response.status_code)] += 1
    text = response.content.decode(errors="replace")
    if response.status_code >= 500:
        report.server_errors.append(f"{case.as_curl_command()}\n  -> {response.status_code} {text[:300]}")
    elif stream_error(response.status_code, text):
        report.stream_errors.append(f"{case.as_curl_command()}\n  -> {text[-300:]}")
    for name in REPORTED_CHECKS:
        try:
            case.validate_response(response, checks=[getattr(checks, name)])
        except (AssertionError, FailureGroup):  # a finding to count, not a reason to stop
            report.conformance[f"{name}: {label.rsplit(' ', 1)[0]}"] += 1


def fuzz(url: str, examples: int, seconds: float, timeout: float, report: Report) -> None:
    """Every operation in both generation modes, at most `examples` cases each, in equal shares of `seconds`."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", timeout=30)
    pairs = [(r.ok(), mode) for r in schema.get_all_operations()
             for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    end, session = time.monotonic() + seconds, requests.Session()
    for i, (op, mode) in enumerate(pairs):
        label = f"{op.method.upper()} {op.path} {mode.value}"
        stop_at = time.monotonic() + (end - time.monotonic()) / (len(pairs) - i)  # an equal share of what is left

        @seed(0)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case) -> None:
            if time.monotonic() > stop_at:
                raise _OutOfTime  # hypothesis has no other way to stop early; nothing shrinks (generate only)
            send(case, url, session, timeout, report, label)

        try:
            run()
        except _OutOfTime:
            pass
        except Unsatisfiable:  # an operation without parameters has no negative case
            report.skipped.append(f"{label}: no case can break its schema")


def run_all(url: str, examples: int, seconds: float, timeout: float) -> Report:
    """Reference, fuzz, idle gauges, reference again."""
    report = Report(reference_before=reference(url))
    fuzz(url, examples, seconds, timeout, report)
    report.idle = wait_idle(url)
    try:
        report.reference_after = reference(url)
    except Exception as e:  # a dead or failing server is a finding
        report.reference_after = f"<{type(e).__name__}: {e}>"
    return report


def render(report: Report, command: str, elapsed: float) -> str:
    from common import machine_line, markdown_table

    codes = sorted({s for c in report.statuses.values() for s in c}, key=lambda s: (not s.isdigit(), s))
    rows = [[label, sum(c.values()), *(c.get(s, 0) for s in codes)] for label, c in report.statuses.items()]
    lines = [command, machine_line(), f"{report.cases} cases in {elapsed:.0f} s; work capped at {CAP}", "",
             markdown_table(["operation / mode", "cases", *codes], rows), "",
             f"reference before: {report.reference_before!r}", f"reference after:  {report.reference_after!r}",
             f"gauges once idle: {json.dumps(report.idle)}", ""]
    verdict = report.failures()
    lines.append("FAIL: " + "; ".join(verdict) if verdict else "PASS: no 5xx, no hang, same reference, idle")
    for title, items in (("server errors", report.server_errors), ("hangs", report.hangs),
                         ("200 streams carrying an error event", report.stream_errors),
                         ("skipped", report.skipped)):
        if items:
            lines += ["", f"## {title} ({len(items)}; first 10)", *items[:10]]
    if report.conformance:
        lines += ["", "## schema conformance failures (reported, not failed on)",
                  *(f"{k}: {v}" for k, v in sorted(report.conformance.items()))]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=500, help="cases per operation and generation mode")
    ap.add_argument("--minutes", type=float, default=4.0, help="stop generating after this long")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds without a byte that count as a hang")
    ap.add_argument("--url", help="fuzz this server instead of starting one")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz_api.txt")
    args = ap.parse_args()
    proc, url = (None, args.url) if args.url else start_server(SERVER_ARGS, Path("/tmp/openseek-fuzz-server.log"))
    t0 = time.monotonic()
    try:
        report = run_all(url, args.examples, args.minutes * 60, args.timeout)
    finally:
        if proc is not None:
            stop_server(proc)
    command = "python bench/fuzz_api.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                       if v is not None and k not in ("out", "url"))
    text = render(report, command + (f" (server: openseek serve {' '.join(SERVER_ARGS)})" if proc else ""),
                  time.monotonic() - t0)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raise SystemExit(1 if report.failures() else 0)


if __name__ == "__main__":
    main()
