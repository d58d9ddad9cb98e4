"""Typed configuration of the rating app; every field is also a command-line flag."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKEN_ENV = "POSELOOP_TOKEN"
MIN_TOKEN_LENGTH = 8
MIN_TOKEN_DISTINCT = 4  # a token of one or two repeated characters is among the first an attacker tries
PAIR_ORDERS = ("coverage", "active")
# A rubric is read beside the score buttons, on a phone too: one short line per end of the scale.
RUBRIC_PART_MAX = 120


class ConfigError(ValueError):
    """An invalid setting; the message names the flag and says how to fix it."""


def flag_name(field_name: str) -> str:
    """The command-line flag of a config field (samples_dir -> --samples-dir)."""
    return "--" + field_name.replace("_", "-")


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


def split_host_list(value: str | Sequence[str]) -> tuple[str, ...]:
    """Host names from a comma-separated string (the flag) or a sequence (Python callers)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(str(item).strip() for item in items if str(item).strip())


@dataclass
class AppConfig:
    """Settings of `python -m webapp`."""

    samples_dir: Path = field(
        default=Path("samples"),
        metadata={"help": "Samples directory; image paths in the database are relative to it."},
    )
    db_url: str | None = field(
        default=None,
        metadata={"help": "SQLAlchemy database URL (default: sqlite:///<samples-dir>/feedback.sqlite); a "
                          "team shares postgresql+psycopg://user:password@host/dbname."},
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Address to bind. A non-loopback address (LAN sharing) requires --token."},
    )
    port: int = field(default=8765, metadata={"help": "TCP port to listen on."})
    token: str | None = field(
        default=None,
        metadata={
            "help": f"Shared access token; raters open http://HOST:PORT/?token=TOKEN once. "
            f"Also read from ${TOKEN_ENV} so it stays out of the process list."
        },
    )
    allowed_hosts: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Comma-separated host names (or addresses) the browser may use to reach the app, e.g. "
            "rating.lan,gpu-box.local; requires --token. Loopback names, the --host address and, with a "
            "token, IP addresses are always accepted; other Host headers are refused (DNS rebinding).",
            "parse": split_host_list,
        },
    )
    score_min: int = field(default=-5, metadata={"help": "Lowest score on the scale (>= -9)."})
    score_max: int = field(default=5, metadata={"help": "Highest score on the scale (<= 10)."})
    rubric: str = field(
        default="",
        metadata={
            "help": "What the scale means, shown to raters in the start dialog and beside the buttons: one "
                    "sentence, or the lowest and the highest end separated by '|', e.g. 'pose ignored or body "
                    f"broken | pose matched, natural person' (at most {RUBRIC_PART_MAX} characters per part)."
        },
    )
    server: str = field(
        default="waitress",
        metadata={
            "help": "WSGI server: 'waitress' (multi-threaded, production-grade) or 'werkzeug' "
            "(Flask's threaded development server).",
            "choices": ("waitress", "werkzeug"),
        },
    )
    threads: int = field(default=8, metadata={"help": "Worker threads of the WSGI server."})
    pair_order: str = field(
        default="coverage",
        metadata={
            "help": "Order of pairs in pairs mode: 'coverage' (the groups and pairs judged least first) or "
                    "'active' (first the pairs the latest reward model in --models-dir is least sure about, "
                    "by ensemble disagreement; coverage order while there is no usable reward model).",
            "choices": PAIR_ORDERS,
        },
    )
    models_dir: Path = field(
        default=Path("models"),
        metadata={"help": "Models folder of train_reward.py; --pair-order active reads <models-dir>/reward/latest."},
    )

    loop: bool = field(
        default=False,
        metadata={"help": "Loop mode: a 'Train next round' button (and --loop-min-labels) queues a job that trains the "
                          "reward model, then the policy, then generates the next loop round; the page shows its "
                          "progress and /progress the loop's rounds. Same token rules as every write."},
    )
    loop_min_labels: int = field(
        default=96,
        metadata={"help": "Loop mode: queue the next job by itself once the newest loop round has this many labels "
                          "(scores plus decided pairs, every rater); 0 = only the button."},
    )
    loop_preset: str = field(
        default="default",
        metadata={"help": "Loop mode: what each job runs: 'default' (README's loop: reward model, DDPO on it, a "
                          "round, a blind A/B against the previous policy), 'no-ab' (no A/B rounds), 'tiny-lcm' "
                          "(4-step LCM rounds, RLCM) or 'quick' (a smoke run of the mechanics).",
                  "choices": ("default", "no-ab", "tiny-lcm", "quick")},
    )
    loop_reward_args: str = field(default="", metadata={"help": "Loop mode: extra train_reward.py arguments, e.g. "
                                                                "'--preset quick'."})
    loop_policy_args: str = field(default="", metadata={"help": "Loop mode: extra train_policy.py arguments, e.g. "
                                                                "'--set train.epochs=4'."})
    loop_generate_args: str = field(default="", metadata={"help": "Loop mode: extra generate.py arguments (the next "
                                                                  "round keeps the last loop round's prompts and "
                                                                  "poses unless these change them)."})
    loop_compare_args: str = field(default="", metadata={"help": "Loop mode: extra evaluate.py arguments of the blind "
                                                                 "A/B, e.g. '--set data.max_groups=24'."})
    loop_worker: str = field(
        default="local",
        metadata={"help": "Loop mode: 'local' starts `python -m poseloop.worker` for this database, samples and "
                          "--models-dir (restarted if it dies; log in <samples-dir>/.loop-worker.log); 'external' "
                          "when a worker runs elsewhere (e.g. a GPU box sharing the database and samples folder).",
                  "choices": ("local", "external")},
    )
    loop_worker_threads: int = field(default=0, metadata={"help": "Loop mode: torch threads of the local worker; "
                                                                   "0 = torch's default."})
    loop_stale_after: float = field(
        default=120.0,
        metadata={"help": "Loop mode: seconds without a heartbeat after which a running job's worker counts as dead "
                          "and the job is retried (or failed after 3 attempts)."},
    )

    def validate(self) -> AppConfig:
        """Check every field; raise ConfigError naming the offending flag."""
        self.samples_dir = Path(self.samples_dir)
        if not self.samples_dir.is_dir():
            raise ConfigError(f"--samples-dir: {self.samples_dir} is not a directory (run generate.py first "
                              f"or point --samples-dir at an existing samples folder)")
        if self.db_url is not None and "://" not in self.db_url:
            raise ConfigError(f"--db-url: {self.db_url!r} is not an SQLAlchemy URL (e.g. sqlite:///path/to.db or "
                              "postgresql+psycopg://user:password@host/dbname)")
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port: {self.port} is outside 1..65535")
        if self.token is not None:
            self._check_token(self.token)
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                f"--host: {self.host} is not a loopback address, so anyone on the network could read and "
                f"change the labels; pass --token SECRET (or set ${TOKEN_ENV}) to share on a LAN, "
                f"or bind to 127.0.0.1"
            )
        self.allowed_hosts = self._clean_allowed_hosts()
        if self.score_min < -9 or self.score_max > 10:
            raise ConfigError("--score-min/--score-max: the keyboard scale supports -9..10 (digit keys)")
        if self.score_min >= self.score_max:
            raise ConfigError(f"--score-min ({self.score_min}) must be below --score-max ({self.score_max})")
        self.rubric = self._clean_rubric()
        if self.server not in ("waitress", "werkzeug"):
            raise ConfigError(f"--server: {self.server!r} is not one of waitress, werkzeug")
        if not 1 <= self.threads <= 64:
            raise ConfigError(f"--threads: {self.threads} is outside 1..64")
        if self.pair_order not in PAIR_ORDERS:
            raise ConfigError(f"--pair-order: {self.pair_order!r} is not one of {', '.join(PAIR_ORDERS)}")
        self.models_dir = Path(self.models_dir)
        if self.loop:
            self._check_loop()
        return self

    def _check_loop(self) -> None:
        """The loop flags: a preset, arguments each step's parser accepts, a worker mode, sane numbers."""
        from poseloop.configlib import ConfigError as StepConfigError
        from poseloop.loop_config import check_plan

        if self.loop_min_labels < 0:
            raise ConfigError(f"--loop-min-labels: {self.loop_min_labels} is negative; 0 turns the automatic job off")
        if self.loop_worker not in ("local", "external"):
            raise ConfigError(f"--loop-worker: {self.loop_worker!r} is not one of local, external")
        if not 10 <= self.loop_stale_after <= 86400:
            raise ConfigError(f"--loop-stale-after: {self.loop_stale_after} is outside 10..86400 seconds")
        if self.loop_worker_threads < 0:
            raise ConfigError(f"--loop-worker-threads: {self.loop_worker_threads} is negative")
        try:
            plan = self.loop_plan
            if self.loop_worker == "local":  # an external worker's paths need not exist here
                check_plan(plan)
        except StepConfigError as e:
            raise ConfigError(str(e)) from None

    @property
    def loop_plan(self) -> Any:  # -> poseloop.loop_config.LoopPlan
        """What each loop job runs: the preset with the extra arguments."""
        from poseloop.loop_config import make_plan

        return make_plan(self.loop_preset, self.loop_reward_args, self.loop_policy_args, self.loop_generate_args,
                         self.loop_compare_args)

    @staticmethod
    def _check_token(token: str) -> None:
        """Refuse a token that is blank, holds spaces or control characters, is short or repeats a few characters."""
        fix = f"pass e.g. --token $(python -c 'import secrets; print(secrets.token_urlsafe(16))') (or set ${TOKEN_ENV})"
        if not token.strip():
            raise ConfigError(f"--token: is blank (only whitespace), which anyone can guess; {fix}")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigError(f"--token: contains whitespace or control characters, which are lost or changed in "
                              f"URLs and headers; {fix}")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"--token: use at least {MIN_TOKEN_LENGTH} characters so it cannot be guessed quickly; "
                              f"{fix}")
        if len(set(token)) < MIN_TOKEN_DISTINCT:
            raise ConfigError(f"--token: {len(set(token))} distinct characters (e.g. 'aaaaaaaa') are guessed first; "
                              f"{fix}")

    def _clean_allowed_hosts(self) -> tuple[str, ...]:
        """The --allowed-hosts names, normalised; a ConfigError for a bad name or a missing token."""
        names = []
        for raw in split_host_list(self.allowed_hosts):
            name = normalize_host_name(raw)
            if name is None:
                raise ConfigError(f"--allowed-hosts: {raw!r} is not a host name or IP address (give names "
                                  f"without scheme or port, separated by commas, e.g. rating.lan,gpu-box.local)")
            names.append(name)
        if names and not self.token:
            raise ConfigError("--allowed-hosts: names other than localhost can be pointed at this machine by "
                              "anyone's DNS (DNS rebinding), so they need --token SECRET (or "
                              f"${TOKEN_ENV}) as well")
        return tuple(names)

    def _clean_rubric(self) -> str:
        """The --rubric text with its parts stripped and joined by ' | '; a ConfigError for a bad one."""
        text = str(self.rubric or "").strip()
        if not text:
            return ""
        if any(ord(c) < 32 for c in text):
            raise ConfigError("--rubric: keep it on one line (no line breaks or control characters); separate "
                              "the low and the high end with '|'")
        parts = [p.strip() for p in text.split("|")]
        if len(parts) > 2 or not all(parts):
            shown = text if len(text) <= 60 else text[:57] + "..."
            raise ConfigError(f"--rubric: {shown!r} is neither one sentence nor 'LOW END | HIGH END'; use "
                              "at most one '|', with text on both sides of it")
        for name, part in zip(("sentence",) if len(parts) == 1 else ("low end", "high end"), parts):
            if len(part) > RUBRIC_PART_MAX:
                raise ConfigError(f"--rubric: the {name} is {len(part)} characters; shorten it to at most "
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
        from poseloop.db import default_db_url

        return self.db_url or default_db_url(self.samples_dir)


def _field_type(tp: Any) -> type:
    """The scalar type of an annotation such as `str | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def config_from_mapping(overrides: Mapping[str, Any] | AppConfig | None) -> AppConfig:
    """An AppConfig from a mapping of field names (unknown names are an error)."""
    if isinstance(overrides, AppConfig):
        return overrides
    known = {f.name for f in dataclasses.fields(AppConfig)}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return AppConfig(**dict(overrides or {}))


def build_parser() -> argparse.ArgumentParser:
    """An argument parser with one flag per AppConfig field."""
    parser = argparse.ArgumentParser(
        prog="python -m webapp",
        description="Browser rating app: scores and pairwise preferences for poseloop samples.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(AppConfig)
    for f in dataclasses.fields(AppConfig):
        kind = f.metadata.get("parse") or _field_type(hints[f.name])
        if kind is bool:  # --loop / --no-loop
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=f.metadata["help"])
            continue
        parser.add_argument(
            flag_name(f.name),
            dest=f.name,
            type=kind,
            default=f.default,
            choices=f.metadata.get("choices"),
            help=f.metadata["help"],
        )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> AppConfig:
    """Parse flags (and $POSELOOP_TOKEN) into a validated AppConfig."""
    ns = build_parser().parse_args(argv)
    cfg = AppConfig(**vars(ns))
    if cfg.token is None and os.environ.get(TOKEN_ENV):
        cfg.token = os.environ[TOKEN_ENV]
    return cfg.validate()
