"""The keyboard shortcuts: one list feeds the help dialog, and a test checks docs/RATING.md names each."""

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
