"""Active pair choice: the pairs of a round ordered by the latest reward model's uncertainty.

With `--pair_order active` (or `?order=active` on /api/rounds/<id>/pairs) pairs mode asks first about
the pairs the newest reward model (`<models-dir>/reward/latest`) is least sure about: the ensemble
members' disagreement on P(a beats b), from `poseloop.rewards.model.suggest_pairs` on the round's stored
final latents. The order is computed once per (round, reward model version, number of pairs) and kept in
memory; a new version written by train_reward.py is picked up on the next request.

Without a usable reward model (none trained yet, unreadable, trained on latents of another shape) or
without readable trajectories for every sample of the round, the app falls back to coverage order and
says why once in the log.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from poseloop.data.db import Group, Sample

# Resolution of the order: ensemble stds within 1/LEVELS of the round's largest std (and then P(a beats b)
# within 1/LEVELS of 0.5) count as equally uncertain; among such ties the per-rater hash decides, so
# raters asking at the same moment get different pairs.
LEVELS = 20
# Latents scored per suggest_pairs call (whole groups), so a large round never sits in memory at once.
CHUNK_LATENTS = 64

Pair = tuple[int, int]


@dataclass(frozen=True)
class ActiveOrder:
    """Priority of every canonical pair (a < b) of a round under one reward model version; lower first."""

    version: str
    priority: Mapping[Pair, tuple[int, int]]
    std: Mapping[Pair, float]  # ensemble std of P(a beats b), for information


class PairRanker:
    """Computes and caches active pair orders; thread-safe (one computation at a time)."""

    def __init__(self, samples_dir: str | Path, models_dir: str | Path, log: logging.Logger | None = None) -> None:
        from poseloop.data.store import SampleStore

        self.samples = SampleStore(samples_dir)
        self.models_dir = Path(models_dir)
        self.log = log or logging.getLogger("webapp.active")
        self._lock = threading.Lock()
        self._orders: dict[tuple[int, str, int], ActiveOrder | None] = {}
        self._model: tuple[str, Any] | None = None
        self._said: set[str] = set()

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.log.warning("%s", message)

    def latest_version(self) -> str | None:
        """The version named by <models_dir>/reward/latest, or None (said once) when there is none."""
        from poseloop.rewards.versions import read_latest

        try:
            return read_latest(self.models_dir)
        except (OSError, ValueError) as exc:
            self._say_once("no-model", f"pair order 'active': no usable reward model ({exc}); pairs use coverage "
                                       "order until one is trained (python train_reward.py "
                                       f"--output.models_dir {self.models_dir})")
            return None

    def order(self, session: Session, round_id: int, pairs_by_group: Mapping[int, list[Pair]]) -> ActiveOrder | None:
        """The active order of the round's pairs, or None (coverage order; the reason is logged once)."""
        version = self.latest_version()
        if version is None:
            return None
        key = (round_id, version, sum(len(ps) for ps in pairs_by_group.values()))
        with self._lock:
            if key not in self._orders:
                # Orders of older versions are never asked for again.
                self._orders = {k: v for k, v in self._orders.items() if k[1] == version}
                self._orders[key] = self._compute(session, round_id, version, pairs_by_group)
            return self._orders[key]

    def _load_model(self, version: str) -> Any:
        from poseloop.rewards.loading import load_reward_model

        if self._model is None or self._model[0] != version:
            self._model = None
            model = load_reward_model(version, self.models_dir, device="cpu")
            self._model = (version, model)
        return self._model[1]

    def _compute(self, session: Session, round_id: int, version: str,
                 pairs_by_group: Mapping[int, list[Pair]]) -> ActiveOrder | None:
        import torch

        from poseloop.rewards.model import LatentShapeError, suggest_pairs
        from poseloop.data.store import load_trajectory

        fallback = f"pair order 'active', round {round_id}, reward model {version}: "
        try:
            model = self._load_model(version)
        except Exception as exc:  # noqa: BLE001 - any unreadable version means coverage order, said once
            self._say_once(f"load:{version}", f"pair order 'active': reward model {version} in {self.models_dir} "
                                              f"cannot be loaded ({type(exc).__name__}: {exc}); pairs use coverage order")
            return None
        paths = dict(session.execute(select(Sample.id, Sample.trajectory_path).where(Sample.round_id == round_id)).all())
        missing = sorted(sid for sid, p in paths.items() if not p)
        if missing:
            self._say_once(f"traj:{round_id}:{version}", fallback + f"{len(missing)} sample(s) have no stored trajectory "
                           f"(imported images, e.g. sample {missing[0]}), so they cannot be scored; coverage order")
            return None
        conditions: dict[int, tuple[str, dict[str, Any]]] = {}
        if getattr(model, "conditioned", False):  # the model also reads each sample's prompt and pose
            for sid, prompt, kp, w, h in session.execute(
                    select(Sample.id, Group.prompt, Group.keypoints_json, Sample.width, Sample.height)
                    .join(Group, Sample.group_id == Group.id).where(Sample.round_id == round_id)):
                conditions[sid] = (prompt, {"keypoints": kp, "width": w, "height": h})
        suggestions: list[tuple[float, float, Pair]] = []
        chunk_ids: list[int] = []
        chunk_pairs: list[Pair] = []

        def flush() -> None:
            lat = torch.stack([load_trajectory(self.samples.abs(paths[sid]), f"sample {sid}").latents[-1].float()
                               for sid in chunk_ids])
            index = {sid: i for i, sid in enumerate(chunk_ids)}
            cond = [conditions[sid] for sid in chunk_ids] if conditions else None
            for s in suggest_pairs(model, lat, [(index[a], index[b]) for a, b in chunk_pairs],
                                   prompts=[c[0] for c in cond] if cond else None,
                                   metadata=[c[1] for c in cond] if cond else None):
                suggestions.append((s.std, s.p_a, (chunk_ids[s.a], chunk_ids[s.b])))
            chunk_ids.clear()
            chunk_pairs.clear()

        try:
            for gid in sorted(pairs_by_group):
                ps = pairs_by_group[gid]
                chunk_ids.extend(sorted({x for p in ps for x in p}))
                chunk_pairs.extend(ps)
                if len(chunk_ids) >= CHUNK_LATENTS:
                    flush()
            if chunk_ids:
                flush()
        except LatentShapeError as exc:
            self._say_once(f"shape:{round_id}:{version}", fallback + f"its latent shape does not fit the round ({exc}); "
                           "coverage order")
            return None
        except RuntimeError as exc:
            # torch.stack of latents of different shapes within one round.
            self._say_once(f"shape:{round_id}:{version}", fallback + f"latents cannot be scored together ({exc}); "
                           "coverage order")
            return None
        except (OSError, ValueError) as exc:
            self._say_once(f"traj:{round_id}:{version}", fallback + f"a trajectory cannot be read ({exc}); coverage order")
            return None
        # The order of suggest_pairs, across chunks: most disagreement first, then P closest to 0.5.
        # (Sorting is only for the log line and for readers of ActiveOrder; next_pairs uses priority.)
        suggestions.sort(key=lambda t: (-t[0], abs(t[1] - 0.5), t[2]))
        top = suggestions[0][0] if suggestions else 0.0
        priority = {pair: (round(LEVELS * (1 - s / top)) if top > 0 else 0, round(LEVELS * 2 * abs(p - 0.5)))
                    for s, p, pair in suggestions}
        std = {pair: s for s, _p, pair in suggestions}
        self.log.info("pair order 'active': round %d ordered by reward model %s (%d pairs, max std %.4f)",
                      round_id, version, len(priority), max(std.values(), default=0.0))
        return ActiveOrder(version, priority, std)


__all__ = ["LEVELS", "ActiveOrder", "PairRanker"]
