"""The keyboard shortcuts: one list feeds the help dialog, and a test checks docs/RATING.md names each.

SHORTCUTS is the general table (any scale); `for_scale` is what the help dialog shows: the digit rows
rewritten to the keys that score on the configured scale, so the help never offers a key that fails.
"""

from __future__ import annotations

# (where, keys, what). Keys are shown as written; the page's JS implements exactly these.
SHORTCUTS: list[tuple[str, str, str]] = [
    ("everywhere", "?", "show / hide this help"),
    ("everywhere", "Esc", "close help, fullscreen or dialog"),
    ("everywhere", "m", "switch score mode / pairwise mode"),
    ("everywhere", "g", "grid view on / off"),
    ("everywhere", "b", "blind comparison mode on / off"),
    ("everywhere", "n", "only unrated on / off"),
    ("everywhere", "o", "pose overlay on the image on / off (otherwise side by side)"),
    ("everywhere", "f", "fullscreen view on / off"),
    ("everywhere", "z", "zoom to 100% in fullscreen on / off (click works too)"),
    ("everywhere", "u / Ctrl+Z", "undo the last label in this round and mode (blind mode: the last verdict)"),
    ("score", "0 … 9", "give that score and go to the next image"),
    ("score", "Shift+1 … Shift+9", "give the negative score (-1 … -9) and go to the next image"),
    ("score", "- then 1 … 9", "same as Shift+digit, in two keys"),
    ("score", "← / →", "previous / next image"),
    ("score", "Space", "next image without a score"),
    ("score", "Home / End", "first / last image"),
    ("pairs", "← or a", "left image is better"),
    ("pairs", "→ or d", "right image is better"),
    ("pairs", "↓ or t", "tie: equally good"),
    ("pairs", "↑ or s", "skip this pair"),
    ("blind", "← or a", "left image is better"),
    ("blind", "→ or d", "right image is better"),
    ("blind", "↓ or t", "tie: equally good"),
    ("blind", "↑ or s", "skip this pair"),
    ("grid", "← → ↑ ↓", "move the selection"),
    ("grid", "0 … 9, Shift+1 … 9", "score the selected image"),
    ("grid", "Enter", "open the selected image in score mode"),
]

# The rows of SHORTCUTS that name digit keys; for_scale replaces them.
_DIGIT_ROWS = {("score", "0 … 9"), ("score", "Shift+1 … Shift+9"), ("score", "- then 1 … 9"),
               ("grid", "0 … 9, Shift+1 … 9")}


def fmt_score(v: int) -> str:
    """A score as the page shows it: +3, 0, -2."""
    return f"+{v}" if v > 0 else str(v)


def _span(items: list[str], sep: str = " … ") -> str:
    """'1 … 5' for a run of three or more, '1 / 2' for two, '1' for one."""
    return sep.join([items[0], items[-1]]) if len(items) > 2 else " / ".join(items)


def score_keys(score_min: int, score_max: int) -> dict[str, list[int]]:
    """The digits that score on this scale, as the page's scoreFromKey reads them.

    'plain': digit d gives d; 'shift': Shift+d (or - then d) gives -d; 'ten': 0 gives 10 (1..10 scales).
    """
    return {
        "plain": [d for d in range(10) if score_min <= d <= score_max],
        "shift": [d for d in range(1, 10) if score_min <= -d <= score_max],
        "ten": [0] if score_min > 0 and score_max >= 10 else [],
    }


def scale_rows(score_min: int, score_max: int) -> tuple[list[tuple[str, str, str]], str]:
    """The score-mode digit rows of the help for one scale, and grid mode's digit keys (only keys that
    give a score on it)."""
    k = score_keys(score_min, score_max)
    rows, grid = [], []
    if k["plain"]:
        keys = _span([str(d) for d in k["plain"]])
        scores = _span([fmt_score(d) for d in k["plain"]])
        rows.append(("score", keys, f"give that score ({scores}) and go to the next image"))
        grid.append(keys)
    if k["ten"]:
        rows.append(("score", "0", "give +10 and go to the next image"))
        grid.append("0 (+10)")
    if k["shift"]:
        digits = _span([str(d) for d in k["shift"]])
        negs = _span([str(-d) for d in k["shift"]])
        rows.append(("score", _span([f"Shift+{d}" for d in k["shift"]]),
                     f"give the negative score ({negs}) and go to the next image"))
        rows.append(("score", f"- then {digits}", "same as Shift+digit, in two keys"))
        grid.append(f"Shift+{digits}")
    return rows, ", ".join(grid)


def for_scale(score_min: int, score_max: int) -> list[tuple[str, str, str]]:
    """SHORTCUTS with the digit rows written for this scale, in the same places."""
    score_rows, grid_keys = scale_rows(score_min, score_max)
    out: list[tuple[str, str, str]] = []
    for where, keys, what in SHORTCUTS:
        if (where, keys) not in _DIGIT_ROWS:
            out.append((where, keys, what))
        elif where == "score" and keys == "0 … 9":
            out.extend(score_rows)
        elif where == "grid":
            out.append(("grid", grid_keys, what))
    return out


def scale_hint(score_min: int, score_max: int) -> str:
    """The one-line key reminder under the score buttons, for this scale."""
    k = score_keys(score_min, score_max)
    plain = ([_span([str(d) for d in k["plain"]])] if k["plain"] else []) + (["0 for +10"] if k["ten"] else [])
    parts = [", ".join(plain) + " score and advance"] if plain else []
    if k["shift"]:
        parts.append(f"Shift+{_span([str(d) for d in k['shift']])} for {_span([str(-d) for d in k['shift']])}")
    return " · ".join(parts)
