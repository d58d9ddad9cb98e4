"""Blind comparisons: baseline vs candidate images of the same seed and pose, judged without knowing which is which.

A comparison's pairs are the samples with the same (group index, sample index) in its baseline and its
candidate round. A pair is named by the token "<group index>-<sample index>", which both sides share, so
it says nothing about which image is which. Which side the candidate is shown on comes from a keyed hash
of (rater, comparison, pair) with a secret key that only the server holds: stable across reloads and
restarts, different between raters and pairs, and not computable by a rater.

Nothing the blind page receives names a round, a sample, a group or a policy: images and the pose come
through /media/blind/... routes that look the files up here, and judgement / undo answers carry the
choice as the rater made it (left/right/tie/skip), never the outcome.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from poseloop.data.db import BlindJudgement, Comparison, Group, Rater, Round, Sample, get_or_create_rater

from .store import CHOICES, ApiError, find_rater
from .queries import iso

TOKEN_RE = re.compile(r"^(\d{1,9})-(\d{1,9})$")
SIDES = ("left", "right")
KEY_FILE = ".poseloop_blind_key"


def load_key(samples_dir: Path) -> bytes:
    """The server's secret side key, created once (mode 0600) in the samples directory."""
    path = Path(samples_dir) / KEY_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    key = path.read_text().strip()
    if len(key) < 32:  # a half-written file from a concurrent first start: wait for the writer
        raise ApiError(503, "blind key is being created, retry")
    return bytes.fromhex(key)


def left_is_candidate(key: bytes, rater: str, comparison_id: int, token: str) -> bool:
    """Which side the candidate is shown on, for this rater and pair."""
    msg = f"{rater}\x00{comparison_id}\x00{token}".encode()
    return hmac.new(key, msg, hashlib.sha256).digest()[0] & 1 == 1


def _order_hash(rater: str, comparison_id: int, token: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{rater}:{comparison_id}:{token}".encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True)
class Pair:
    """One baseline/candidate pair of a comparison (server side only)."""

    token: str
    baseline_sample_id: int
    candidate_sample_id: int
    baseline_group_id: int
    prompt: str


def get_comparison(session: Session, comparison_id: int) -> Comparison:
    """The comparison or a 404 ApiError."""
    comp = session.get(Comparison, comparison_id)
    if comp is None:
        raise ApiError(404, f"unknown comparison {comparison_id}")
    return comp


def _round_index(session: Session, round_id: int) -> dict[tuple[int, int], tuple[int, int, str]]:
    rows = session.execute(
        select(Group.index, Sample.index, Sample.id, Group.id, Group.prompt)
        .join(Group, Sample.group_id == Group.id)
        .where(Sample.round_id == round_id)
    ).all()
    return {(gi, si): (sid, gid, prompt) for gi, si, sid, gid, prompt in rows}


def comparison_pairs(session: Session, comp: Comparison) -> dict[str, Pair]:
    """{token: pair} of every (group index, sample index) present in both rounds, in index order."""
    base = _round_index(session, comp.baseline_round_id)
    cand = _round_index(session, comp.candidate_round_id)
    out: dict[str, Pair] = {}
    for gi, si in sorted(set(base) & set(cand)):
        b_sid, b_gid, prompt = base[(gi, si)]
        out[f"{gi}-{si}"] = Pair(f"{gi}-{si}", b_sid, cand[(gi, si)][0], b_gid, prompt)
    return out


def clean_token(value: Any) -> str:
    """A syntactically valid pair token or a 400."""
    if not isinstance(value, str) or not TOKEN_RE.match(value):
        raise ApiError(400, f"'pair' must be a pair token like '3-1', got {value!r}")
    return value


def get_pair(session: Session, comp: Comparison, token: str) -> Pair:
    """The pair of this token or a 404."""
    pair = comparison_pairs(session, comp).get(clean_token(token))
    if pair is None:
        raise ApiError(404, f"unknown pair {token!r} in comparison {comp.id}")
    return pair


def pair_json(comparison_id: int, pair: Pair, rater: str) -> dict[str, Any]:
    """What the blind page gets for a pair: token, prompt and opaque image URLs, nothing else."""
    base = f"/media/blind/{comparison_id}/{pair.token}"
    q = "?rater=" + quote(rater, safe="")
    return {
        "pair": pair.token,
        "prompt": pair.prompt,
        "pose_url": f"{base}/pose{q}",
        "left_url": f"{base}/left{q}",
        "right_url": f"{base}/right{q}",
    }


def _judged(session: Session, comparison_id: int, rater_id: int | None) -> dict[int, BlindJudgement]:
    """{baseline sample id: judgement} of one rater in a comparison."""
    if rater_id is None:
        return {}
    rows = session.scalars(
        select(BlindJudgement).where(BlindJudgement.comparison_id == comparison_id, BlindJudgement.rater_id == rater_id)
    )
    return {j.baseline_sample_id: j for j in rows}


def progress(session: Session, comparison_id: int, rater_id: int | None, total: int) -> dict[str, int]:
    """How many pairs of the comparison this rater has judged (skips included)."""
    done = 0
    if rater_id is not None:
        done = session.scalar(
            select(func.count()).select_from(BlindJudgement)
            .where(BlindJudgement.comparison_id == comparison_id, BlindJudgement.rater_id == rater_id)
        ) or 0
    return {"done": done, "total": total}


# ---------------------------------------------------------------- reads


def list_comparisons(session: Session) -> list[dict[str, Any]]:
    """Every comparison, newest first: id, name, number of pairs. Nothing about the rounds behind it."""
    comps = session.scalars(select(Comparison).order_by(Comparison.id.desc())).all()
    return [{"id": c.id, "name": c.name, "pairs": len(comparison_pairs(session, c)), "created_at": iso(c.created_at)}
            for c in comps]


def next_pairs(
    session: Session, comparison_id: int, rater_name: str, count: int, exclude: set[str]
) -> dict[str, Any]:
    """The next `count` pairs this rater has not judged: pairs judged least by anyone first, then a
    per-rater order, so raters working at once spread over the pairs and a reload shows the same pair."""
    comp = get_comparison(session, comparison_id)
    pairs = comparison_pairs(session, comp)
    rater = find_rater(session, rater_name)
    judged = _judged(session, comparison_id, rater.id if rater else None)
    counts = Counter(session.scalars(
        select(BlindJudgement.baseline_sample_id).where(BlindJudgement.comparison_id == comparison_id)
    ))
    open_pairs = [p for p in pairs.values() if p.baseline_sample_id not in judged and p.token not in exclude]
    open_pairs.sort(key=lambda p: (counts[p.baseline_sample_id], _order_hash(rater_name, comparison_id, p.token)))
    return {
        "comparison": {"id": comp.id, "name": comp.name},
        "pairs": [pair_json(comparison_id, p, rater_name) for p in open_pairs[:count]],
        "progress": {"done": len(judged), "total": len(pairs)},
    }


def media_path(session: Session, key: bytes, comparison_id: int, token: str, what: str, rater: str) -> str | None:
    """The relative file of one side (or the pose) of a pair as this rater sees it."""
    comp = get_comparison(session, comparison_id)
    pair = get_pair(session, comp, token)
    if what == "pose":
        return session.scalar(select(Group.condition_path).where(Group.id == pair.baseline_group_id))
    if what not in SIDES:
        raise ApiError(404, f"unknown image {what!r}: left, right or pose")
    cand_left = left_is_candidate(key, rater, comparison_id, pair.token)
    sid = pair.candidate_sample_id if (what == "left") == cand_left else pair.baseline_sample_id
    return session.scalar(select(Sample.image_path).where(Sample.id == sid))


# ---------------------------------------------------------------- writes


def _choice_of(j: BlindJudgement) -> str:
    """The choice as the rater made it (left/right/tie/skip), from the stored outcome and side."""
    if j.outcome in ("tie", "skip"):
        return j.outcome
    return "left" if (j.outcome == "candidate") == j.left_is_candidate else "right"


def _token_of(pairs: dict[str, Pair], baseline_sample_id: int) -> Pair | None:
    return next((p for p in pairs.values() if p.baseline_sample_id == baseline_sample_id), None)


def submit(
    session: Session, key: bytes, comparison_id: int, rater_name: str, token: str, choice: Any, request_id: str | None
) -> dict[str, Any]:
    """Record a blind verdict. The answer names the pair and the choice, never the outcome."""
    if choice not in CHOICES:
        raise ApiError(400, f"'choice' must be one of {', '.join(CHOICES)}, got {choice!r}")
    comp = get_comparison(session, comparison_id)
    pairs = comparison_pairs(session, comp)
    pair = pairs.get(clean_token(token))
    if pair is None:
        raise ApiError(404, f"unknown pair {token!r} in comparison {comparison_id}")
    rater = get_or_create_rater(session, rater_name)
    if request_id is not None:
        prior = session.scalar(
            select(BlindJudgement).where(BlindJudgement.rater_id == rater.id, BlindJudgement.request_id == request_id)
        )
        if prior is not None:
            if (prior.comparison_id, prior.baseline_sample_id, _choice_of(prior)) != (comparison_id,
                                                                                      pair.baseline_sample_id, choice):
                raise ApiError(409, f"request_id {request_id!r} was already used for a different label")
            return _answer(session, comp, pairs, rater.id, prior, duplicate=True)
    existing = session.scalar(select(BlindJudgement).where(
        BlindJudgement.comparison_id == comparison_id, BlindJudgement.rater_id == rater.id,
        BlindJudgement.baseline_sample_id == pair.baseline_sample_id))
    if existing is not None:
        if _choice_of(existing) == choice:
            return _answer(session, comp, pairs, rater.id, existing, duplicate=True)
        raise ApiError(409, f"pair {token!r} is already judged ({_choice_of(existing)}); undo it first to change it")
    cand_left = left_is_candidate(key, rater_name, comparison_id, pair.token)
    if choice in ("tie", "skip"):
        outcome = choice
    else:
        outcome = "candidate" if (choice == "left") == cand_left else "baseline"
    j = BlindJudgement(comparison_id=comparison_id, rater_id=rater.id, baseline_sample_id=pair.baseline_sample_id,
                       candidate_sample_id=pair.candidate_sample_id, left_is_candidate=cand_left, outcome=outcome,
                       request_id=request_id)
    session.add(j)
    session.flush()
    return _answer(session, comp, pairs, rater.id, j, duplicate=False)


def _answer(session: Session, comp: Comparison, pairs: dict[str, Pair], rater_id: int, j: BlindJudgement,
            duplicate: bool) -> dict[str, Any]:
    pair = _token_of(pairs, j.baseline_sample_id)
    return {
        "judgement": {"pair": pair.token if pair else None, "choice": _choice_of(j), "created_at": iso(j.created_at)},
        "duplicate": duplicate,
        "progress": progress(session, comp.id, rater_id, len(pairs)),
    }


def undo(session: Session, comparison_id: int, rater_name: str, token: Any) -> dict[str, Any]:
    """Remove the rater's verdict on `token` (or, without a token, the latest one) so the pair comes back.

    With a token a repeated undo is harmless: the second finds nothing to remove.
    """
    comp = get_comparison(session, comparison_id)
    pairs = comparison_pairs(session, comp)
    target = None
    if token is not None:
        target = pairs.get(clean_token(token))
        if target is None:
            raise ApiError(404, f"unknown pair {token!r} in comparison {comparison_id}")
    rater = find_rater(session, rater_name)
    none = {"undone": None, "progress": progress(session, comparison_id, rater.id if rater else None, len(pairs))}
    if rater is None:
        return none
    q = select(BlindJudgement).where(BlindJudgement.comparison_id == comparison_id, BlindJudgement.rater_id == rater.id)
    if target is not None:
        q = q.where(BlindJudgement.baseline_sample_id == target.baseline_sample_id)
    # Verdicts are never changed in place (a new verdict needs an undo first), so the highest id is the latest.
    j = session.scalar(q.order_by(BlindJudgement.id.desc()).limit(1))
    if j is None:
        return none
    pair = _token_of(pairs, j.baseline_sample_id)
    choice = _choice_of(j)
    session.execute(delete(BlindJudgement).where(BlindJudgement.id == j.id))
    session.flush()
    return {
        "undone": {"pair": pair_json(comparison_id, pair, rater.name) if pair else None, "choice": choice},
        "progress": progress(session, comparison_id, rater.id, len(pairs)),
    }


# ---------------------------------------------------------------- results (identity revealed: not for the blind page)


def tally(outcomes: list[str]) -> dict[str, Any]:
    """Counts and the candidate's win rate with ties counted half (skips left out of n)."""
    c = Counter(outcomes)
    n = c["candidate"] + c["baseline"] + c["tie"]
    return {
        "candidate_wins": c["candidate"],
        "baseline_wins": c["baseline"],
        "ties": c["tie"],
        "skips": c["skip"],
        "n": n,
        "candidate_win_rate": round((c["candidate"] + 0.5 * c["tie"]) / n, 4) if n else None,
    }


def _round_ref(r: Round) -> dict[str, Any]:
    return {"round_id": r.id, "name": r.name, "policy_version": r.policy_version, "created_at": iso(r.created_at)}


def results(session: Session, comparison_id: int) -> dict[str, Any]:
    """Per rater and total verdict counts of a comparison, with both rounds named."""
    comp = get_comparison(session, comparison_id)
    rows = session.execute(
        select(Rater.name, BlindJudgement.outcome)
        .join(Rater, BlindJudgement.rater_id == Rater.id)
        .where(BlindJudgement.comparison_id == comparison_id)
    ).all()
    by_rater: dict[str, list[str]] = {}
    for name, outcome in rows:
        by_rater.setdefault(name, []).append(outcome)
    return {
        "id": comp.id,
        "name": comp.name,
        "created_at": iso(comp.created_at),
        "baseline": _round_ref(comp.baseline_round),
        "candidate": _round_ref(comp.candidate_round),
        "pairs": len(comparison_pairs(session, comp)),
        "raters": [{"rater": name, **tally(by_rater[name])} for name in sorted(by_rater, key=str.lower)],
        "total": tally([o for _n, o in rows]),
    }
