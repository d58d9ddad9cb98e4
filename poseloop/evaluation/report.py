"""An evaluation's results and the report written beside the candidate: report.md, metrics.json, metrics.png, grid.png."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from poseloop.config.lib import to_dict
from poseloop.data.store import SampleStore, atomic_write, save_png

if TYPE_CHECKING:
    from poseloop.config.evaluation import EvaluateConfig


@dataclass
class Pair:
    """The baseline and candidate sample that share a group index, sample index and seed."""

    baseline_id: int
    candidate_id: int
    prompt: str
    keypoints: list[dict[str, Any]] | None
    condition_path: str
    source_image_path: str | None
    baseline_image: str
    candidate_image: str
    baseline_trajectory: str | None
    candidate_trajectory: str | None
    width: int
    height: int


@dataclass
class MetricSummary:
    """One metric over all pairs."""

    name: str
    spec: str
    baseline_mean: float
    baseline_ci: tuple[float, float]
    candidate_mean: float
    candidate_ci: tuple[float, float]
    diff_mean: float
    diff_ci: tuple[float, float]
    win_rate: float  # candidate better than baseline, ties count half
    n: int
    note: str = ""
    reward_model_version: str = ""  # the learned reward model's concrete version, for latent metrics


@dataclass
class EvalResult:
    """What an evaluation produced."""

    name: str
    candidate: str
    baseline: str
    pairs: int
    metrics: list[MetricSummary]
    skipped: dict[str, str]
    blind: dict[str, Any] | None
    report_dir: Path
    seconds: float
    command: str = ""  # evaluate.py command that refreshes exactly this evaluation
    pinned_specs: dict[str, str] = dataclasses.field(default_factory=dict)  # metric as asked -> with versions
    lineage: str = ""  # the candidate's chain of parent policies back to the base model

    def summary(self) -> str:
        """The one-line terminal summary."""
        parts = [f"{m.name} {m.baseline_mean:.3g} -> {m.candidate_mean:.3g} (win {m.win_rate:.0%})" for m in self.metrics]
        if self.blind and self.blind["n"]:
            parts.append(f"blind win {self.blind['win_rate']:.0%} of {self.blind['n']}")
        return (f"{self.name}: {self.candidate} vs {self.baseline} on {self.pairs} pairs: "
                f"{'; '.join(parts) or 'no metrics'} in {self.seconds:.0f} s -> {self.report_dir / 'report.md'}")


def render_grid(pairs: list[Pair], store: SampleStore, rows: int, cell: int = 192) -> Image.Image:
    """Rows of condition | baseline | candidate | prompt, one row per pair (first `rows` pairs)."""
    chosen = pairs[:rows]
    text_w = 2 * cell
    grid = Image.new("RGB", (3 * cell + text_w, cell * len(chosen) + 24), "white")
    draw = ImageDraw.Draw(grid)
    for col, title in enumerate(("condition", "baseline", "candidate", "prompt")):
        draw.text((col * cell + 6, 6), title, fill="black")
    for r, p in enumerate(chosen):
        y = 24 + r * cell
        for col, path in enumerate((store.abs(p.condition_path), store.abs(p.baseline_image), store.abs(p.candidate_image))):
            with Image.open(path) as im:
                grid.paste(im.convert("RGB").resize((cell, cell)), (col * cell, y))
        words, line, lines = p.prompt.split(), "", []
        for w in words:  # wrap by character count: the default bitmap font is ~6 px wide
            if len(line) + len(w) + 1 > text_w // 7:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((3 * cell + 8, y + 8), "\n".join(lines), fill="black")
    return grid


def plot_metrics(metrics: list[MetricSummary], path: Path) -> None:
    """Paired difference (candidate - baseline) of each metric with its interval, against zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(metrics), 1)
    fig, axes = plt.subplots(1, n, figsize=(2.8 * n, 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        # The means of both sides are often close; the paired difference shows what changed.
        lo, hi = m.diff_ci
        ax.errorbar([0], [m.diff_mean], yerr=[[m.diff_mean - lo], [hi - m.diff_mean]], fmt="o", color="#2f6fde",
                    capsize=8)
        ax.axhline(0.0, color="#8a8f98", lw=1, ls="--")
        ax.set_xticks([])
        ax.set_title(f"{m.name}\ncandidate - baseline\nwin rate {m.win_rate:.0%} (n={m.n})", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(result: EvalResult, cfg: EvaluateConfig, pairs: list[Pair], store: SampleStore) -> None:
    """report.md, metrics.json, metrics.png and grid.png in the report folder (each written atomically)."""
    out = result.report_dir
    out.mkdir(parents=True, exist_ok=True)
    plot_metrics(result.metrics, out / "metrics.png")
    save_png(render_grid(pairs, store, cfg.eval.grid_rows), out / "grid.png")
    pct = int(cfg.eval.confidence * 100)
    lines = [f"# Evaluation {result.name}", "",
             f"Candidate **{result.candidate}** against baseline **{result.baseline}** on {result.pairs} image pairs "
             f"(same prompt, pose and seed on both sides; {cfg.sample.steps} DDIM steps, guidance "
             f"{cfg.sample.guidance_scale}, base model `{cfg.model.base}`).", "",
             *([f"Lineage: {result.lineage} (`python train_policy.py --lineage {result.candidate}` prints what each "
                "was trained on).", ""] if result.lineage else []),
             f"| metric | baseline (mean, {pct}% CI) | candidate (mean, {pct}% CI) | difference ({pct}% CI) | candidate win rate | n |",
             "|---|---|---|---|---|---|"]
    for m in result.metrics:
        lines.append(f"| {m.name} | {m.baseline_mean:.4g} [{m.baseline_ci[0]:.4g}, {m.baseline_ci[1]:.4g}] | "
                     f"{m.candidate_mean:.4g} [{m.candidate_ci[0]:.4g}, {m.candidate_ci[1]:.4g}] | "
                     f"{m.diff_mean:+.4g} [{m.diff_ci[0]:+.4g}, {m.diff_ci[1]:+.4g}] | {m.win_rate:.0%} | {m.n} |")
    notes = [f"- **{m.name}**: {m.note}" for m in result.metrics if m.note]
    notes += [f"- **{name}** skipped: {why}" for name, why in result.skipped.items()]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", "Win rate: the fraction of pairs where the candidate's value is higher (ties count half); for "
              "LPIPS lower is better, so its win rate counts pairs where the candidate is closer to the source.",
              f"Intervals: percentile bootstrap over pairs ({cfg.eval.bootstrap} resamples).", ""]
    blind = result.blind
    lines += ["## Blind human comparison", ""]
    if blind and blind["n"]:
        lines.append(f"{blind['n']} verdicts in the rating app's blind mode: candidate preferred {blind['candidate']}, "
                     f"baseline {blind['baseline']}, ties {blind['tie']} (skips {blind['skip']}): candidate win rate "
                     f"{blind['win_rate']:.0%} (ties count half).")
    else:
        lines.append(f"No blind verdicts yet. Open the rating app (`python -m webapp`), choose blind mode and the "
                     f"comparison `{result.name}`, then run the command below again: existing rounds are reused "
                     "and the report is refreshed.")
    lines += ["", "To refresh this report (same policies, reward models, prompts, poses and seeds):", "",
              "```bash", result.command, "```"]
    lines += ["", "![paired differences](metrics.png)", "", "![condition / baseline / candidate / prompt](grid.png)", ""]
    data = {"name": result.name, "candidate": result.candidate, "baseline": result.baseline, "pairs": result.pairs,
            "metrics": [dataclasses.asdict(m) for m in result.metrics], "skipped": result.skipped,
            "blind": result.blind, "command": result.command, "pinned_specs": result.pinned_specs,
            "lineage": result.lineage,
            "config": to_dict(cfg)}
    atomic_write(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
    atomic_write(out / "report.md", lambda tmp: tmp.write_text("\n".join(lines)))
