"""The sandbox side of rewards.py: `python -I -B reward_worker.py PROGRAM FUNCTION` reads a JSON list of
{"completion", "answer"} on stdin and writes one JSON line: per item the function's {part: number} or null.

Stdlib only (it starts in milliseconds, without torch). Sockets are refused before the program loads (the
parent also puts the process in a network namespace of its own where it can). A program's prints go nowhere, so
only this file writes the result line; an item whose call raises, or returns anything but a dict of finite
numbers, is null (the parent scores it 0)."""

import importlib.util
import io
import json
import math
import socket
import sys


def _refuse(*args, **kwargs):
    raise OSError("reward programs have no network")


def _no_network() -> None:
    for name in ("socket", "create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, _refuse)


def _clean(parts) -> dict | None:
    if not isinstance(parts, dict) or not parts:
        return None
    out = {}
    for k, v in parts.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        out[k] = float(v)
    return out


def main() -> None:
    program, function = sys.argv[1], sys.argv[2]
    items = json.loads(sys.stdin.read())
    real_stdout = sys.stdout
    sys.stdout = sys.stderr = io.StringIO()  # the program's prints are not results
    _no_network()
    spec = importlib.util.spec_from_file_location("reward_program", program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, function)
    results = []
    for item in items:
        try:
            results.append(_clean(fn(item["completion"], item["answer"])))
        except Exception:  # this item scores 0; the rest of the batch goes on
            results.append(None)
    real_stdout.write(json.dumps(results) + "\n")
    real_stdout.flush()


if __name__ == "__main__":
    main()
