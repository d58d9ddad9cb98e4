"""Many threads posting labels to a real server: every label stored once, no lock errors."""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter

from sqlalchemy import func, select

from poseloop.data.db import LabelEvent, Preference, Rating, open_db, session_scope
from webapp_fixtures import BOTH_DATABASES, Env, LiveServer, app, env  # noqa: F401  (pytest fixtures)

RATERS = 25
LABELS = 24  # per rater: 12 scores (each sample of a round once) and 12 preferences


@BOTH_DATABASES
def test_fifty_threads_store_each_label_exactly_once(app, env: Env) -> None:  # noqa: F811
    rid = env.rounds[0]
    samples = [s for g in env.groups[rid] for s in env.samples[g]]
    pairs = [(ids[i], ids[j]) for g in env.groups[rid] for ids in [env.samples[g]]
             for i in range(len(ids)) for j in range(i + 1, len(ids))][:12]
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(2 * RATERS)

    def worker(rater: int, port: int) -> None:
        # Two threads per rater send the same requests (same request ids) at the same time: a worst-case
        # double submission. Exactly one copy of each must be stored.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        start.wait()
        for k in range(LABELS):
            if k % 2 == 0:
                path = "/api/scores"
                body = {"rater": f"r{rater}", "sample_id": samples[k // 2], "score": (rater + k) % 11 - 5}
            else:
                a, b = pairs[k // 2]
                path = "/api/preferences"
                body = {"rater": f"r{rater}", "left_id": b, "right_id": a, "choice": ["left", "right", "tie"][k % 3]}
            body["request_id"] = f"r{rater}-{k}"
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            with lock:
                statuses[resp.status] += 1
                if resp.status not in (200, 201):
                    errors.append(f"{resp.status} {data[:200]!r}")
        conn.close()

    with LiveServer(app, threads=8) as srv:
        threads = [threading.Thread(target=worker, args=(r, srv.port)) for r in range(RATERS) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors[:5]
    total = RATERS * LABELS
    assert statuses[201] == total and statuses[200] == total  # one stored, one recognised as a retry

    factory = open_db(env.db_url)
    with session_scope(factory) as s:
        assert s.scalar(select(func.count()).select_from(LabelEvent)) == total
        assert s.scalar(select(func.count()).select_from(Rating)) == RATERS * 12
        assert s.scalar(select(func.count()).select_from(Preference)) == RATERS * 12
        dup_events = s.execute(
            select(LabelEvent.rater_id, LabelEvent.request_id).group_by(LabelEvent.rater_id, LabelEvent.request_id)
            .having(func.count() > 1)
        ).all()
        assert dup_events == []
    factory.kw["bind"].dispose()


@BOTH_DATABASES
def test_one_raters_concurrent_changes_form_an_unbroken_history(env: Env) -> None:  # noqa: F811
    """Eight threads change one rater's score of one sample at once: each event's old value is the previous
    event's new value, and the stored score is the last event's, so undo restores what was really there."""
    import random

    from webapp.store import Store
    from webapp.labels import submit_score

    store = Store.open(env.db_url)
    sid = env.samples[env.groups[env.rounds[0]][0]][0]
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        rng = random.Random(t)
        start.wait()
        try:
            for k in range(15):
                score = rng.randint(-5, 5)
                store.write(lambda s: submit_score(s, "ann", sid, score, f"t{t}-{k}", (-5, 5), cache=store.cache))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    events = store.read(lambda s: [(e.old_score, e.new_score) for e in s.scalars(
        select(LabelEvent).where(LabelEvent.sample_id == sid).order_by(LabelEvent.id))])
    final = store.read(lambda s: s.scalar(select(Rating.score).where(Rating.sample_id == sid)))
    store.dispose()
    assert len(events) == 8 * 15
    assert events[0][0] is None
    broken = [i for i in range(1, len(events)) if events[i][0] != events[i - 1][1]]
    assert broken == [], f"{len(broken)} events record an old score that was not the stored one"
    assert final == events[-1][1]
