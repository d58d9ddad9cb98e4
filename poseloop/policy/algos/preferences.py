"""Offline preference data: the rating database's decisive judgements as pairs of stored trajectories.

Read by D3PO with d3po.source=db (and by any pairwise algorithm after it). Every file is checked here,
before the model loads, so that a missing or unreadable trajectory fails in a second with its name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from poseloop.data.inputs import InputError
from poseloop.config.policy import D3POConfig


class TrainingInputError(InputError):
    """Training data (preferences, trajectories) is missing or unusable; the message says what to do."""


@dataclass
class PreferencePair:
    """A human judgement turned into a (winner, loser) pair of stored trajectories of one group."""

    winner_path: Path
    loser_path: Path
    prompt: str
    condition_path: Path
    group_key: str
    round_name: str = ""  # the round of the judged samples, and the judgement's ids: what the run's identity hashes
    rater_id: int = 0
    winner_id: int = 0
    loser_id: int = 0


def load_preference_pairs(d3po: D3POConfig) -> list[PreferencePair]:
    """Every decisive preference (ties and skips ignored) with its files checked; errors name what is missing."""
    from sqlalchemy import select

    from poseloop.data import db
    from poseloop.data.store import SampleStore, TrajectoryError, check_trajectory

    store = SampleStore(d3po.samples_dir)
    url = d3po.db_url or db.default_db_url(store.root)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise TrainingInputError(f"d3po.db_url: no database at {url.removeprefix('sqlite:///')}; run generate.py and "
                                 "rate pairs in the rating app first (or pass --d3po.samples_dir)")
    factory = db.open_db(url, "d3po.db_url")
    with db.session_scope(factory) as session:
        query = select(db.Preference).where(db.Preference.choice.in_(("a", "b")))
        prefs = list(session.scalars(query))
        total = session.query(db.Preference).count()
        pairs: list[PreferencePair] = []
        missing: list[str] = []
        unreadable: list[TrajectoryError] = []  # header checked here, before the model loads
        left_out = 0
        for p in prefs:
            win = session.get(db.Sample, p.winner_id)
            lose = session.get(db.Sample, p.loser_id)
            assert win is not None and lose is not None
            rnd = session.get(db.Round, win.round_id)
            if d3po.rounds and (rnd is None or rnd.name not in d3po.rounds):
                continue
            if win.group_id != lose.group_id:
                continue  # D3PO compares images of one prompt and pose; cross-group pairs carry no signal here
            group = session.get(db.Group, win.group_id)
            assert group is not None
            paths = []
            n_unreadable = len(unreadable)
            for s in (win, lose):
                if s.trajectory_path is None:
                    missing.append(f"sample {s.id} ({s.image_path}) has no stored trajectory")
                    paths.append(Path())
                    continue
                path = store.abs(s.trajectory_path)
                if not path.is_file():
                    missing.append(str(path))
                elif (bad := check_trajectory(path, f"sample {s.id}")) is not None:
                    unreadable.append(bad)
                paths.append(path)
            if len(unreadable) > n_unreadable and d3po.skip_unreadable:
                left_out += 1
                continue
            pairs.append(PreferencePair(paths[0], paths[1], group.prompt, store.abs(group.condition_path),
                                        f"{group.id}", rnd.name if rnd is not None else "", p.rater_id, win.id,
                                        lose.id))
    if unreadable and not d3po.skip_unreadable:
        n_files = len({e.path for e in unreadable})
        more = f" ({n_files - 1} more unreadable file(s) of preferred pairs)" if n_files > 1 else ""
        raise TrajectoryError(f"{unreadable[0]}{more}; or pass --d3po.skip_unreadable true to train on the other pairs",
                              unreadable[0].path, unreadable[0].short)
    if unreadable:
        print(f"warning: d3po.skip_unreadable: left out {left_out} preference pair(s) with "
              f"{len({e.path for e in unreadable})} unreadable trajectory file(s), e.g. {unreadable[0].short}",
              file=sys.stderr)
        if not pairs:
            raise TrainingInputError("every preference pair has an unreadable trajectory file; restore the samples "
                                     "folder or regenerate the rounds (generate.py --store.round <round name>)")
    if not pairs:
        if total:
            raise TrainingInputError(f"no usable preferences: {total} stored, none decisive (a/b) within one group"
                                     + (f" of rounds {d3po.rounds}" if d3po.rounds else "")
                                     + "; ties and skips carry no direction. Rate more pairs in the rating app.")
        raise TrainingInputError(f"no preferences yet in {db.shown_db_url(url)}: rate pairs in the rating app (webapp) "
                                 "first, or use --algo ddpo with a reward")
    if missing:
        raise TrainingInputError(f"{len(missing)} trajectory file(s) of preferred pairs are missing, e.g. "
                                 f"{missing[0]}; restore the samples folder, or run generate.py again with that round's settings "
                                 "and --store.round <round name>: it regenerates missing files from their seeds")
    for p in pairs:
        if not p.condition_path.is_file():
            raise TrainingInputError(f"pose image {p.condition_path} of a preferred pair is missing")
    return pairs
