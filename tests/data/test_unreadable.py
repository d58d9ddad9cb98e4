"""A corrupted trajectory: one line naming the file and the sample in train_reward.py and train_policy.py
--algo d3po, or, on request, left out with a warning that counts what was left out (no model needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import train_policy
import train_reward
from fake_samples import corrupt, make_samples
from poseloop.config.policy import D3POConfig
from poseloop.policy.algos.preferences import load_preference_pairs


@pytest.fixture
def samples(tmp_path: Path) -> tuple[Path, dict[int, Path]]:
    root = tmp_path / "samples"
    return root, make_samples(root)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "SafetensorError" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _reward_argv(root: Path, models: Path, *extra: str) -> list[str]:
    return ["--data.samples_dir", str(root), "--output.models_dir", str(models), "--output.version", "v1",
            "--set", "train.epochs=2", "--set", "train.ensemble_size=1", "--set", "train.holdout_fraction=0.34",
            *extra]


def test_train_reward_names_the_unreadable_file_and_sample(samples: tuple[Path, dict[int, Path]], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, paths = samples
    sid = sorted(paths)[4]
    corrupt(paths[sid])
    with pytest.raises(SystemExit) as exc:
        train_reward.main(_reward_argv(root, tmp_path / "models"))
    assert exc.value.code == 2
    line = _one_line_error(capsys)
    assert str(paths[sid]) in line and f"sample {sid}" in line and "--data.skip_unreadable true" in line
    assert not (tmp_path / "models" / "reward" / "v1").exists()


def test_train_reward_can_leave_unreadable_samples_out(samples: tuple[Path, dict[int, Path]], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    root, paths = samples
    sid = sorted(paths)[4]
    corrupt(paths[sid])
    assert train_reward.main(_reward_argv(root, tmp_path / "models", "--data.skip_unreadable", "true")) == 0
    err = capsys.readouterr().err
    # One score and the two pairs of its group of three that involve the sample.
    assert "left out 1 labelled sample(s) whose trajectory is missing or unreadable (1 scores and 2 preferences" in err
    assert str(paths[sid]) in err
    metrics = json.loads((tmp_path / "models" / "reward" / "v1" / "metrics.json").read_text())
    assert metrics["n_unreadable_samples_left_out"] == 1
    assert metrics["n_scores"] == len(paths) - 1 and metrics["n_preferences"] == 6 * 3 - 2


def test_d3po_names_the_unreadable_file_and_sample(samples: tuple[Path, dict[int, Path]], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root, paths = samples
    sid = sorted(paths)[1]
    corrupt(paths[sid])
    with pytest.raises(SystemExit) as exc:  # refused before any model loads
        train_policy.main(["--algo", "d3po", "--d3po.samples_dir", str(root),
                           "--model.models_dir", str(tmp_path / "models")])
    assert exc.value.code == 2
    line = _one_line_error(capsys)
    assert str(paths[sid]) in line and f"sample {sid}" in line and "--d3po.skip_unreadable true" in line


def test_d3po_can_leave_pairs_with_unreadable_trajectories_out(samples: tuple[Path, dict[int, Path]],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root, paths = samples
    sid = sorted(paths)[1]
    corrupt(paths[sid])
    pairs = load_preference_pairs(D3POConfig(samples_dir=str(root), skip_unreadable=True))
    assert len(pairs) == 6 * 3 - 2
    assert all(paths[sid] not in (p.winner_path, p.loser_path) for p in pairs)
    err = capsys.readouterr().err
    assert "left out 2 preference pair(s) with 1 unreadable trajectory file(s)" in err and str(paths[sid]) in err
