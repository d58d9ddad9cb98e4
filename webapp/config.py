"""Typed configuration of the rating app; every field is also a command-line flag (poseloop.config.lib, as for
the scripts: `--samples_dir DIR`, `--set samples_dir=DIR`, `--print-config`)."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poseloop.config.lib import ConfigError, build_parser as build_config_parser, field, parse_config

TOKEN_ENV = "POSELOOP_TOKEN"
MIN_TOKEN_LENGTH = 8
MIN_TOKEN_DISTINCT = 4  # a token of one or two repeated characters is among the first an attacker tries
PAIR_ORDERS = ("coverage", "active")
# A rubric is read beside the score buttons, on a phone too: one short line per end of the scale.
RUBRIC_PART_MAX = 120
DESCRIPTION = "Browser rating app: scores and pairwise preferences for poseloop samples."
PROG = "python -m webapp"


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        # A host name other than localhost may resolve to anything; treat it as exposed.
        return False


# One DNS name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME_RE = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$")


def normalize_host_name(name: str) -> str | None:
    """`name` lower-cased with IPv6 brackets dropped, or None when it is not a host name or IP address."""
    name = name.strip().lower()
    try:
        return str(ipaddress.ip_address(name.strip("[]") if name.startswith("[") else name))
    except ValueError:
        return name if _HOST_NAME_RE.match(name) else None


def split_host_list(value: str | Sequence[str]) -> list[str]:
    """Host names from a comma-separated string or a sequence of them (`--allowed_hosts a,b c`)."""
    items = [value] if isinstance(value, str) else list(value)
    return [name.strip() for item in items for name in str(item).split(",") if name.strip()]


@dataclass
class AppConfig:
    """Settings of `python -m webapp`."""

    samples_dir: Path = field(
        default=Path("samples"),
        help="Samples directory; image paths in the database are relative to it.",
    )
    db_url: str | None = field(
        default=None,
        help="SQLAlchemy database URL (default: sqlite:///<samples_dir>/feedback.sqlite); a team shares "
             "postgresql+psycopg://user:password@host/dbname.",
    )
    host: str = field(default="127.0.0.1",
                      help="Address to bind. A non-loopback address (LAN sharing) requires --token.")
    port: int = field(default=8765, help="TCP port to listen on.")
    token: str | None = field(
        default=None,
        help=f"Shared access token; raters open http://HOST:PORT/?token=TOKEN once. Also read from ${TOKEN_ENV} "
             "so it stays out of the process list.",
        secret=True,
    )
    allowed_hosts: list[str] = field(
        default_factory=list,
        help="Host names (or addresses) the browser may use to reach the app, e.g. rating.lan gpu-box.local "
             "(commas separate names too); requires --token. Loopback names, the --host address and, with a "
             "token, IP addresses are always accepted; other Host headers are refused (DNS rebinding).",
    )
    score_min: int = field(default=-5, help="Lowest score on the scale (>= -9).")
    score_max: int = field(default=5, help="Highest score on the scale (<= 10).")
    rubric: str = field(
        default="",
        help="What the scale means, shown to raters in the start dialog and beside the buttons: one sentence, or "
             "the lowest and the highest end separated by '|', e.g. 'pose ignored or body broken | pose matched, "
             f"natural person' (at most {RUBRIC_PART_MAX} characters per part).",
    )
    server: str = field(
        default="waitress",
        help="WSGI server: 'waitress' (multi-threaded, production-grade) or 'werkzeug' (Flask's threaded "
             "development server).",
        choices=("waitress", "werkzeug"),
    )
    threads: int = field(default=8, help="Worker threads of the WSGI server.")
    pair_order: str = field(
        default="coverage",
        help="Order of pairs in pairs mode: 'coverage' (the groups and pairs judged least first) or 'active' "
             "(first the pairs the latest reward model in --models_dir is least sure about, by ensemble "
             "disagreement; coverage order while there is no usable reward model).",
        choices=PAIR_ORDERS,
    )
    models_dir: Path = field(
        default=Path("models"),
        help="Models folder of train_reward.py; --pair_order active reads <models_dir>/reward/latest.",
    )

    loop: bool = field(
        default=False,
        help="Loop mode: a 'Train next round' button (and --loop_min_labels) queues a job that trains the reward "
             "model, then the policy, then generates the next loop round; the page shows its progress and "
             "/progress the loop's rounds. Same token rules as every write.",
    )
    loop_min_labels: int = field(
        default=96,
        help="Loop mode: queue the next job by itself once the newest loop round has this many labels (scores "
             "plus decided pairs, every rater); 0 = only the button.",
    )
    loop_preset: str = field(
        default="default",
        help="Loop mode: what each job runs: 'default' (README's loop: reward model, DDPO on it, a round, a blind "
             "A/B against the previous policy), 'no-ab' (no A/B rounds), 'tiny-lcm' (4-step LCM rounds, RLCM) or "
             "'quick' (a smoke run of the mechanics).",
        choices=("default", "no-ab", "tiny-lcm", "quick"),
    )
    loop_reward_args: str = field(default="", help="Loop mode: extra train_reward.py arguments, e.g. '--preset quick'.")
    loop_policy_args: str = field(default="", help="Loop mode: extra train_policy.py arguments, e.g. "
                                                   "'--set train.epochs=4'.")
    loop_generate_args: str = field(default="", help="Loop mode: extra generate.py arguments (the next round keeps "
                                                     "the last loop round's prompts and poses unless these change "
                                                     "them).")
    loop_compare_args: str = field(default="", help="Loop mode: extra evaluate.py arguments of the blind A/B, e.g. "
                                                    "'--set data.max_groups=24'.")
    loop_worker: str = field(
        default="local",
        help="Loop mode: 'local' starts `python -m poseloop.worker` for this database, samples and --models_dir "
             "(restarted if it dies; log in <samples_dir>/.loop-worker.log); 'external' when a worker runs "
             "elsewhere (e.g. a GPU box sharing the database and samples folder).",
        choices=("local", "external"),
    )
    loop_worker_threads: int = field(default=0, help="Loop mode: torch threads of the local worker; 0 = torch's "
                                                     "default.")
    loop_stale_after: float = field(
        default=120.0,
        help="Loop mode: seconds without a heartbeat after which a running job's worker counts as dead and the job "
             "is retried (or failed after 3 attempts).",
    )

    def validate(self) -> AppConfig:
        """Check every field; raise ConfigError naming the offending field (its flag is --FIELD)."""
        self.samples_dir = Path(self.samples_dir)
        if not self.samples_dir.is_dir():
            raise ConfigError(f"samples_dir: {self.samples_dir} is not a directory (run generate.py first "
                              f"or point --samples_dir at an existing samples folder)")
        if self.db_url is not None and "://" not in self.db_url:
            raise ConfigError(f"db_url: {self.db_url!r} is not an SQLAlchemy URL (e.g. sqlite:///path/to.db or "
                              "postgresql+psycopg://user:password@host/dbname)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} is outside 1..65535")
        if self.token is not None:
            self._check_token(self.token)
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                f"host: {self.host} is not a loopback address, so anyone on the network could read and "
                f"change the labels; pass --token SECRET (or set ${TOKEN_ENV}) to share on a LAN, "
                f"or bind to 127.0.0.1"
            )
        self.allowed_hosts = self._clean_allowed_hosts()
        for name, value in (("score_min", self.score_min), ("score_max", self.score_max)):
            if not -9 <= value <= 10:
                raise ConfigError(f"{name}: {value} is outside -9..10, the scale the digit keys can give")
        if self.score_min >= self.score_max:
            raise ConfigError(f"score_min: {self.score_min} must be below score_max ({self.score_max})")
        self.rubric = self._clean_rubric()
        if self.server not in ("waitress", "werkzeug"):
            raise ConfigError(f"server: {self.server!r} is not one of waitress, werkzeug")
        if not 1 <= self.threads <= 64:
            raise ConfigError(f"threads: {self.threads} is outside 1..64")
        if self.pair_order not in PAIR_ORDERS:
            raise ConfigError(f"pair_order: {self.pair_order!r} is not one of {', '.join(PAIR_ORDERS)}")
        self.models_dir = Path(self.models_dir)
        if self.loop:
            self._check_loop()
        return self

    def _check_loop(self) -> None:
        """The loop flags: a preset, arguments each step's parser accepts, a worker mode, sane numbers."""
        from poseloop.config.loop import check_plan

        if self.loop_min_labels < 0:
            raise ConfigError(f"loop_min_labels: {self.loop_min_labels} is negative; 0 turns the automatic job off")
        if self.loop_worker not in ("local", "external"):
            raise ConfigError(f"loop_worker: {self.loop_worker!r} is not one of local, external")
        if not 10 <= self.loop_stale_after <= 86400:
            raise ConfigError(f"loop_stale_after: {self.loop_stale_after} is outside 10..86400 seconds")
        if self.loop_worker_threads < 0:
            raise ConfigError(f"loop_worker_threads: {self.loop_worker_threads} is negative")
        plan = self.loop_plan
        if self.loop_worker == "local":  # an external worker's paths need not exist here
            check_plan(plan)

    @property
    def loop_plan(self) -> Any:  # -> poseloop.config.loop.LoopPlan
        """What each loop job runs: the preset with the extra arguments."""
        from poseloop.config.loop import make_plan

        return make_plan(self.loop_preset, self.loop_reward_args, self.loop_policy_args, self.loop_generate_args,
                         self.loop_compare_args)

    @staticmethod
    def _check_token(token: str) -> None:
        """Refuse a token that is blank, holds spaces or control characters, is short or repeats a few characters."""
        fix = f"pass e.g. --token $(python -c 'import secrets; print(secrets.token_urlsafe(16))') (or set ${TOKEN_ENV})"
        if not token.strip():
            raise ConfigError(f"token: is blank (only whitespace), which anyone can guess; {fix}")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError(f"token: contains whitespace or control characters, which are lost or changed in "
                              f"URLs and headers; {fix}")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"token: use at least {MIN_TOKEN_LENGTH} characters so it cannot be guessed quickly; "
                              f"{fix}")
        if len(set(token)) < MIN_TOKEN_DISTINCT:
            raise ConfigError(f"token: {len(set(token))} distinct characters (e.g. 'aaaaaaaa') are guessed first; "
                              f"{fix}")

    def _clean_allowed_hosts(self) -> list[str]:
        """The --allowed_hosts names, normalised; a ConfigError for a bad name or a missing token."""
        names = []
        for raw in split_host_list(self.allowed_hosts):
            name = normalize_host_name(raw)
            if name is None:
                raise ConfigError(f"allowed_hosts: {raw!r} is not a host name or IP address (give names "
                                  f"without scheme or port, e.g. --allowed_hosts rating.lan gpu-box.local)")
            names.append(name)
        if names and not self.token:
            raise ConfigError("allowed_hosts: names other than localhost can be pointed at this machine by "
                              "anyone's DNS (DNS rebinding), so they need --token SECRET (or "
                              f"${TOKEN_ENV}) as well")
        return names

    def _clean_rubric(self) -> str:
        """The rubric text with its parts stripped and joined by ' | '; a ConfigError for a bad one."""
        text = str(self.rubric or "").strip()
        if not text:
            return ""
        if any(ord(c) < 32 for c in text):
            raise ConfigError("rubric: keep it on one line (no line breaks or control characters); separate "
                              "the low and the high end with '|'")
        parts = [p.strip() for p in text.split("|")]
        if len(parts) > 2 or not all(parts):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise ConfigError(f"rubric: {shown!r} is neither one sentence nor 'LOW END | HIGH END'; use "
                              "at most one '|', with text on both sides of it")
        for name, part in zip(("sentence",) if len(parts) == 1 else ("low end", "high end"), parts):
            if len(part) > RUBRIC_PART_MAX:
                raise ConfigError(f"rubric: the {name} is {len(part)} characters; shorten it to at most "
                                  f"{RUBRIC_PART_MAX} (raters read it beside the score buttons, also on a phone)")
        return " | ".join(parts)

    @property
    def rubric_parts(self) -> dict[str, str]:
        """The rubric as {'sentence': ...} or {'low': ..., 'high': ...} ({} when there is none)."""
        parts = [p.strip() for p in self.rubric.split("|")] if self.rubric.strip() else []
        if len(parts) == 2:
            return {"low": parts[0], "high": parts[1]}
        return {"sentence": parts[0]} if parts else {}

    @property
    def resolved_db_url(self) -> str:
        """The database URL, defaulting to the SQLite file in the samples directory."""
        from poseloop.data.db import default_db_url

        return self.db_url or default_db_url(self.samples_dir)


def config_from_mapping(overrides: Mapping[str, Any] | AppConfig | None) -> AppConfig:
    """An AppConfig from a mapping of field names (unknown names are an error)."""
    if isinstance(overrides, AppConfig):
        return overrides
    known = {f.name for f in dataclasses.fields(AppConfig)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return AppConfig(**dict(overrides or {}))


def default() -> AppConfig:
    """The defaults, with the token from $POSELOOP_TOKEN (a flag still overrides it)."""
    return AppConfig(token=os.environ.get(TOKEN_ENV) or None)


PRESETS = {"default": default}


def build_parser() -> argparse.ArgumentParser:
    """The app's argument parser: one --FIELD flag per AppConfig field, --preset, --set and --print-config."""
    return build_config_parser(AppConfig, PRESETS, "default", DESCRIPTION, prog=PROG)


def parse_args(argv: Sequence[str] | None = None) -> AppConfig:
    """Parse flags (and $POSELOOP_TOKEN) into a validated AppConfig; a bad value exits with status 2 naming it."""
    cfg, _ = parse_config(AppConfig, PRESETS, "default", argv, description=DESCRIPTION, prog=PROG)
    return cfg
