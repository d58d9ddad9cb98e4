"""Benchmark of label submissions against the real rating app server on loopback.

Starts `python -m webapp` (waitress, 8 threads) in a subprocess on a temporary samples dir + SQLite DB,
then measures POST /api/scores with
  * 1 client back to back,
  * 50 clients at a fast rater's pace (one label every 300 ms each, ~165 labels/s together),
  * 50 clients back to back (saturation: the most the server does on this machine).
Every tenth label is sent twice with the same request_id, as a double click would. Afterwards the
database rows are counted: every accepted label must be stored exactly once.

    python bench/bench_webapp.py [--seconds 10] [--postgresql]

--postgresql runs the same on a throwaway PostgreSQL server (tests/pg_server.py, Debian's initdb / pg_ctl).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sqlalchemy import func, select  # noqa: E402

from poseloop.data.db import LabelEvent, Rater, Rating, open_db, session_scope  # noqa: E402
from webapp_fixtures import build_samples  # noqa: E402

P99_TARGET_MS = 50.0


@dataclass
class Result:
    """What one scenario measured."""

    name: str
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0  # 201: stored
    duplicates: int = 0  # 200: recognised retry
    errors: list[str] = field(default_factory=list)
    expected_pairs: set[tuple[str, int]] = field(default_factory=set)

    def pct(self, q: float) -> float:
        """The q-quantile latency in ms."""
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/api/config")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server did not start")


def run(name: str, port: int, clients: int, seconds: float, pace_s: float | None, samples: list[int]) -> Result:
    """`clients` threads posting scores for `seconds`; pace_s None = back to back."""
    res = Result(name, clients)
    lock = threading.Lock()
    start_barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        rng = random.Random(i)
        rater = f"{name}-{i}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        lat: list[float] = []
        acc = dup = 0
        errs: list[str] = []
        pairs: set[tuple[str, int]] = set()
        start_barrier.wait()
        next_t, k = time.perf_counter() + (rng.uniform(0, pace_s) if pace_s else 0), 0
        while True:
            if pace_s:
                delay = next_t - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                next_t += pace_s
            if time.perf_counter() >= stop_at[0]:
                break
            sid = samples[(i * 7 + k) % len(samples)]
            body = json.dumps({"rater": rater, "sample_id": sid, "score": rng.randint(-5, 5),
                               "request_id": f"{rater}-{k}"})
            for _attempt in range(2 if k % 10 == 0 else 1):
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/api/scores", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError as exc:
                    errs.append(repr(exc))
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    continue
                lat.append(time.perf_counter() - t0)
                if resp.status == 201:
                    acc += 1
                    pairs.add((rater, sid))
                elif resp.status == 200 and json.loads(data)["duplicate"]:
                    dup += 1
                else:
                    errs.append(f"{resp.status} {data[:120]!r}")
            k += 1
        conn.close()
        with lock:
            res.latencies += lat
            res.accepted += acc
            res.duplicates += dup
            res.errors += errs
            res.expected_pairs |= pairs

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + seconds + 0.05
    t0 = time.perf_counter()
    start_barrier.wait()
    for t in threads:
        t.join()
    res.seconds = time.perf_counter() - t0
    return res


def check_rows(db_url: str, res: Result) -> tuple[int, int, int]:
    """(stored events, stored ratings, duplicated request ids) of one scenario's raters."""
    factory = open_db(db_url)
    with session_scope(factory) as s:
        ids = list(s.scalars(select(Rater.id).where(Rater.name.like(f"{res.name}-%"))))
        events = s.scalar(select(func.count()).select_from(LabelEvent).where(LabelEvent.rater_id.in_(ids))) or 0
        ratings = s.scalar(select(func.count()).select_from(Rating).where(Rating.rater_id.in_(ids))) or 0
        dups = len(s.execute(select(LabelEvent.rater_id, LabelEvent.request_id)
                             .where(LabelEvent.rater_id.in_(ids))
                             .group_by(LabelEvent.rater_id, LabelEvent.request_id).having(func.count() > 1)).all())
    factory.kw["bind"].dispose()
    return events, ratings, dups


def main() -> int:
    """Run the scenarios and print a table; exit 1 when a target fails."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of each scenario")
    ap.add_argument("--threads", type=int, default=8, help="server worker threads")
    ap.add_argument("--postgresql", action="store_true", help="a throwaway PostgreSQL server instead of SQLite")
    args = ap.parse_args()

    pg = None
    if args.postgresql:
        from pg_server import PostgresServer

        pg = PostgresServer().start()
    try:
        return _bench(args, pg.create_database() if pg is not None else None)
    finally:
        if pg is not None:
            pg.stop()


def _bench(args: argparse.Namespace, db_url: str | None) -> int:
    """The scenarios on SQLite (db_url None) or on the given database."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_webapp_"))
    env = build_samples(tmp, n_rounds=1, n_groups=25, k=4, db_url=db_url)
    samples = [s for g in env.groups[env.rounds[0]] for s in env.samples[g]]
    port = free_port()
    # The server log goes to a file: an unread pipe fills up and then blocks the server.
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "webapp", "--samples_dir", str(env.samples_dir), "--port", str(port),
         "--server", "waitress", "--threads", str(args.threads), "--db_url", env.db_url],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        wait_ready(port, proc)
        run("warmup", port, 4, 1.0, None, samples)
        scenarios = [
            run("c1", port, 1, args.seconds, None, samples),
            run("c50paced", port, 50, args.seconds, 0.3, samples),
            run("c50sat", port, 50, args.seconds, None, samples),
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()

    # Client threads and server share this machine's CPUs; other load there shows up in the tail.
    engine = "PostgreSQL" if db_url else "SQLite WAL"
    print(f"\nserver: waitress, {args.threads} threads, {engine} ({env.db_url}); CPUs: {os.cpu_count()}, "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    head = f"{'scenario':<34}{'clients':>8}{'labels':>8}{'labels/s':>10}{'median ms':>11}{'p99 ms':>9}" \
           f"{'retries':>9}{'errors':>8}{'stored ok':>11}"
    print(head)
    print("-" * len(head))
    ok = True
    labels = {"c1": "1 client, back to back", "c50paced": "50 clients, 1 label / 300 ms each",
              "c50sat": "50 clients, back to back"}
    for r in scenarios:
        events, ratings, dups = check_rows(env.db_url, r)
        stored_ok = events == r.accepted and ratings == len(r.expected_pairs) and dups == 0
        ok &= stored_ok and not r.errors
        print(f"{labels[r.name]:<34}{r.clients:>8}{r.accepted:>8}{r.accepted / r.seconds:>10.0f}"
              f"{statistics.median(r.latencies) * 1000:>11.1f}{r.pct(0.99):>9.1f}{r.duplicates:>9}"
              f"{len(r.errors):>8}{'yes' if stored_ok else 'NO':>11}")
        for e in r.errors[:3]:
            print("   error:", e)
    paced = scenarios[1]
    p99_ok = paced.pct(0.99) < P99_TARGET_MS
    print(f"\ntarget p99 < {P99_TARGET_MS:.0f} ms with 50 clients at rater pace: "
          f"{'HOLDS' if p99_ok else 'MISSED'} ({paced.pct(0.99):.1f} ms)")
    print(f"target p99 < {P99_TARGET_MS:.0f} ms with 50 clients back to back: "
          f"{'HOLDS' if scenarios[2].pct(0.99) < P99_TARGET_MS else 'MISSED'} ({scenarios[2].pct(0.99):.1f} ms; "
          f"a saturated closed loop queues ~50 requests, so latency = 50 / throughput)")
    print(f"zero lost or duplicated labels (rows counted afterwards): {'HOLDS' if ok else 'MISSED'}")
    return 0 if ok and p99_ok else 1


if __name__ == "__main__":
    sys.exit(main())
