"""The bench's lookup client, a process of its own.

Run inside the bench process, its requests waited for the GIL behind the bench's producer and
consumer threads, and that wait was measured as the worker's. Here it is a caller like any other.
Reads user ids (a JSON list) on stdin, looks up random ones for ``seconds``, then prints
``{"ms": [...], "timeouts": n}``: ``python -m streams.bench.lookup_client URL SECONDS``.
"""

from __future__ import annotations

import json
import random
import sys
import time
import urllib.error
import urllib.request


def run(url: str, users: list[str], seconds: float, pause_s: float = 0.005) -> dict[str, object]:
    """Look up random users of ``users`` one after another for ``seconds``; latencies in ms."""
    rng = random.Random(7)
    ms: list[float] = []
    timeouts = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"{url}/users/{rng.choice(users)}/features", timeout=10) as r:
                r.read()
        except urllib.error.HTTPError as exc:  # 404: a simulated user without events yet, still an answer
            exc.read()
        except OSError:  # no answer in 10 s (a stalled worker): counted, its wait kept, go on
            timeouts += 1
        ms.append((time.perf_counter() - t0) * 1000)
        time.sleep(pause_s)
    return {"ms": ms, "timeouts": timeouts}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], json.load(sys.stdin), float(sys.argv[2]))))
