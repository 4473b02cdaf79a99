"""A site's privacy ledger: every DP-SGD step it ever took, kept on its own disk.

One ledger per site for the whole run and across runs on the same site folder: creating a
fresh accountant per round would reset epsilon and under-report it. The site's epsilon is
recomputed from all entries (see :mod:`common.privacy.accounting`), exactly as if every
step had run in one central training job, so 3 rounds of 1 epoch cost the same as 3 epochs.

The file is JSON, written atomically (:mod:`common.atomic`) under an exclusive lock on its
folder, so a reader sees the old ledger or the new one, never half of one::

    {"format": "dpfedseg-privacy-ledger", "format_version": 1, "delta": 1e-05,
     "target_epsilon": 8.0, "accountant": "rdp", "entries": [{"noise_multiplier": 1.0,
     "sample_rate": 0.01, "steps": 100, "server_round": 1, "method": "rs"}, ...]}

``accountant`` is the accountant the target is enforced under, fixed by the first budget
check. The accountants give different epsilons for the same entries (RDP's about 11%
above PLD's for 300 steps at q 0.05, sigma 1), so switching between runs could let the
composed epsilon pass the target under the first one. Files without it (written before
it existed) take the accountant of their next check.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import math
import numbers
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from common.atomic import write_json
from common.config import METHODS
from common.privacy.accounting import ACCOUNTANTS, check_accountant, check_delta, compute_epsilon

log = logging.getLogger(__name__)

LEDGER_FORMAT = "dpfedseg-privacy-ledger"
LEDGER_FORMAT_VERSION = 1
DP_METHODS = tuple(method for method in METHODS if method != "none")


@dataclass(frozen=True)
class LedgerEntry:
    """``steps`` DP-SGD steps of the sampled Gaussian mechanism at one ``(sigma, q)``.

    Attributes:
        noise_multiplier: sigma, the noise std in units of the clipping bound (> 0). For
            adaptive clipping this is the original ``z`` the optimiser was built with,
            not the smaller noise left for the gradient after the count query.
        sample_rate: Poisson sampling probability q of each example per step, in (0, 1].
        steps: number of optimiser steps taken (>= 0; 0 steps cost nothing).
        server_round: 1-based Flower round, or None for central (non-federated) training.
        method: the DP training method (one of :data:`DP_METHODS`), or "" when unknown.

    A noise multiplier of 0 is rejected: it gives infinite epsilon, and non-private
    training (method ``none``) keeps no ledger.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    server_round: int | None = None
    method: str = ""

    def __post_init__(self) -> None:
        # Fields are normalised to plain float and int so that equality and JSON are exact.
        object.__setattr__(self, "noise_multiplier", _valid_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", _valid_sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", _valid_steps(self.steps))
        object.__setattr__(self, "server_round", _valid_server_round(self.server_round))
        if self.method != "" and self.method not in DP_METHODS:
            raise ValueError(
                f"ledger entry field 'method' must be one of {', '.join(DP_METHODS)} or empty, "
                f"got {self.method!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as a JSON-ready dict whose keys are the field names."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LedgerEntry":
        """Build an entry from :meth:`to_dict` output; errors name the bad or missing field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a ledger entry must be a mapping of field names, got {data!r}")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"ledger entry has unknown field(s) {', '.join(map(repr, unknown))}; valid "
                f"fields: {', '.join(names)}"
            )
        missing = [name for name in ("noise_multiplier", "sample_rate", "steps") if name not in data]
        if missing:
            raise ValueError(f"ledger entry {dict(data)!r} is missing field(s) {', '.join(missing)}")
        return cls(**data)


def _valid_noise_multiplier(value: Any) -> float:
    sigma = _real_field("noise_multiplier", value)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"ledger entry field 'noise_multiplier' must be a positive finite number, got "
            f"{value!r}; a privacy ledger contains only DP-SGD steps, and sigma 0 gives "
            "infinite epsilon"
        )
    return sigma


def _valid_sample_rate(value: Any) -> float:
    sample_rate = _real_field("sample_rate", value)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"ledger entry field 'sample_rate' must lie in (0, 1], got {value!r}")
    return sample_rate


def _valid_steps(value: Any) -> int:
    steps = _integer_field("steps", value)
    if steps < 0:
        raise ValueError(f"ledger entry field 'steps' must be >= 0, got {value!r}")
    return steps


def _valid_server_round(value: Any) -> int | None:
    if value is None:
        return None
    server_round = _integer_field("server_round", value)
    if server_round < 1:
        raise ValueError(
            f"ledger entry field 'server_round' must be a 1-based round or None, got {value!r}"
        )
    return server_round


def _real_field(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"ledger entry field {name!r} must be a number, got {value!r}")
    return float(value)


def _integer_field(name: str, value: Any) -> int:
    # Integral floats are accepted because Flower metric records and JSON may carry 3.0 for 3.
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"ledger entry field {name!r} must be an integer, got {value!r}")
    return int(value)


class PrivacyLedger:
    """The ledger of one site: its entries, its delta and its epsilon budget.

    Args:
        path: the ledger file on the site's disk. An existing file is loaded, a missing
            one is created by the first :meth:`record`. None keeps the ledger in memory.
        delta: the site's delta; it must equal the delta stored in an existing file,
            because epsilons at different deltas do not compose.
        target_epsilon: the hard budget :meth:`check_budget` enforces. None takes the one
            stored in the file, or sets no budget. A value different from the stored
            one is an error, so a rerun cannot silently raise a site's budget.
        accountant: the accountant the budget will be checked under. One different from
            the accountant stored in the file is an error, as for the target; None
            checks nothing here (:meth:`check_budget` still does).
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        delta: float,
        target_epsilon: float | None = None,
        accountant: str | None = None,
    ) -> None:
        check_delta(delta)
        if target_epsilon is not None and not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be positive or None, got {target_epsilon!r}")
        self._path = None if path is None else Path(path)
        self._delta = float(delta)
        self._target_epsilon = None if target_epsilon is None else float(target_epsilon)
        self._budget_accountant: str | None = None
        self._entries: tuple[LedgerEntry, ...] = ()
        self._epsilon_cache: dict[str, float] = {}
        stored = None if self._path is None else _read_ledger(self._path)
        if stored is not None:
            self._check_stored_delta(stored["delta"])
            self._target_epsilon = self._resolve_target(stored["target_epsilon"])
            self._budget_accountant = stored["accountant"]
            self._entries = stored["entries"]
            log.debug("loaded privacy ledger %s with %d entries", self._path, len(self._entries))
        if accountant is not None:
            check_accountant(accountant)
            self._check_budget_accountant(accountant)

    @property
    def path(self) -> Path | None:
        """The ledger file, or None for an in-memory ledger."""
        return self._path

    @property
    def delta(self) -> float:
        """The delta every epsilon of this ledger is computed at."""
        return self._delta

    @property
    def target_epsilon(self) -> float | None:
        """The epsilon budget, or None when the ledger never rejects a round."""
        return self._target_epsilon

    @property
    def budget_accountant(self) -> str | None:
        """The accountant the target is enforced under; None before the first budget check."""
        return self._budget_accountant

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        """All recorded entries, oldest first."""
        return self._entries

    def epsilon(self, accountant: str = "rdp", *, extra: Sequence[LedgerEntry] = ()) -> float:
        """Return the cumulative epsilon of all entries plus ``extra``, at this ledger's delta."""
        check_accountant(accountant)
        if extra:
            return compute_epsilon(
                self._entries + tuple(extra), delta=self._delta, accountant=accountant
            )
        if accountant not in self._epsilon_cache:
            self._epsilon_cache[accountant] = compute_epsilon(
                self._entries, delta=self._delta, accountant=accountant
            )
        return self._epsilon_cache[accountant]

    def check_budget(self, planned: Sequence[LedgerEntry], *, accountant: str = "rdp") -> str | None:
        """Return None if ``planned`` keeps epsilon within the target, else the rejection reason.

        The reason states the current epsilon, the epsilon the planned steps would reach,
        the target, the accountant and delta. Call it before training a round, and train
        only when it returns None. A ledger without target never rejects. The first check
        fixes the ledger's :attr:`budget_accountant` (stored by the next :meth:`record`);
        a check under another accountant raises ``ValueError``.
        """
        check_accountant(accountant)
        if self._target_epsilon is None:
            return None
        self._check_budget_accountant(accountant)
        self._budget_accountant = accountant
        reached = self.epsilon(accountant, extra=planned)
        if reached <= self._target_epsilon:
            return None
        steps = sum(entry.steps for entry in planned)
        return (
            f"round rejected: {steps} more DP-SGD steps would raise epsilon from "
            f"{self.epsilon(accountant):.4f} to {reached:.4f}, above the target epsilon "
            f"{self._target_epsilon:g} ({accountant} accountant, delta {self._delta:g})"
        )

    def record(self, entries: Sequence[LedgerEntry]) -> None:
        """Append ``entries`` (steps already taken) and, for a file ledger, persist atomically.

        The file is re-read under a lock first. Entries another process appended meanwhile
        are kept, before the new ones, with a warning. A file that lost or changed entries
        this object had loaded raises ``RuntimeError`` and is left untouched.
        """
        new = tuple(entries)
        for entry in new:
            if not isinstance(entry, LedgerEntry):
                raise TypeError(
                    f"record() takes LedgerEntry objects, got {entry!r}; build one with "
                    "LedgerEntry.from_dict"
                )
        if self._path is None:
            self._set_entries(self._entries + new)
            return
        with _folder_lock(self._path.parent):
            stored = _read_ledger(self._path)
            if stored is None and self._entries:
                log.warning(
                    "privacy ledger %s was deleted since it was loaded; writing its %d loaded "
                    "entries back",
                    self._path,
                    len(self._entries),
                )
            on_disk = self._entries if stored is None else self._reconcile(stored)
            first = None if stored is None else stored["accountant"]
            if first is not None and self._budget_accountant not in (None, first):
                # Another process fixed another accountant since this one was loaded. The
                # steps were taken, so they are recorded; the next check raises.
                log.warning(
                    "privacy ledger %s enforces its target under the %s accountant, but this "
                    "run checked the round under %s; recording its steps and keeping %s",
                    self._path, first, self._budget_accountant, first,
                )
            if first is not None:
                self._budget_accountant = first
            merged = on_disk + new
            write_json(self._path, self._payload(merged))
        self._set_entries(merged)

    def _reconcile(self, stored: dict[str, Any]) -> tuple[LedgerEntry, ...]:
        """Return the entries on disk after checking they extend the ones loaded here."""
        self._check_stored_delta(stored["delta"])
        on_disk: tuple[LedgerEntry, ...] = stored["entries"]
        if on_disk[: len(self._entries)] != self._entries:
            raise RuntimeError(
                f"privacy ledger {self._path} no longer starts with the {len(self._entries)} "
                f"entries loaded from it ({len(on_disk)} entries on disk now): it was edited or "
                "replaced while this site was training; restore it before recording more steps"
            )
        if len(on_disk) > len(self._entries):
            log.warning(
                "privacy ledger %s gained %d entries from another process since it was "
                "loaded; appending after them (run one process per site folder)",
                self._path,
                len(on_disk) - len(self._entries),
            )
        return on_disk

    def _set_entries(self, entries: tuple[LedgerEntry, ...]) -> None:
        self._entries = entries
        self._epsilon_cache.clear()

    def _payload(self, entries: Sequence[LedgerEntry]) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "format_version": LEDGER_FORMAT_VERSION,
            "delta": self._delta,
            "target_epsilon": self._target_epsilon,
            "accountant": self._budget_accountant,
            "entries": [entry.to_dict() for entry in entries],
        }

    def _check_stored_delta(self, stored_delta: float) -> None:
        if stored_delta != self._delta:
            raise ValueError(
                f"privacy ledger {self._path} was written with delta {stored_delta!r}, but "
                f"delta {self._delta!r} was requested; epsilons at different deltas do not "
                f"compose, so use delta {stored_delta!r} for this site"
            )

    def _check_budget_accountant(self, accountant: str) -> None:
        pinned = self._budget_accountant
        if pinned is not None and pinned != accountant and self._target_epsilon is not None:
            raise ValueError(
                f"privacy ledger {self._path} enforces target epsilon {self._target_epsilon:g} "
                f"under the {pinned} accountant, but the {accountant} accountant was requested; "
                f"use accountant {pinned} for this site, or keep a new site's ledger in another folder"
            )

    def _resolve_target(self, stored_target: float | None) -> float | None:
        requested = self._target_epsilon
        if requested is None or stored_target is None or requested == stored_target:
            return stored_target if requested is None else requested
        raise ValueError(
            f"privacy ledger {self._path} has target epsilon {stored_target!r}, but "
            f"{requested!r} was requested; use target epsilon {stored_target!r} for this site, "
            "or keep a new site's ledger in another folder"
        )

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(path={self._path}, delta={self._delta:g}, "
            f"target_epsilon={self._target_epsilon}, entries={len(self._entries)})"
        )


def _read_ledger(path: Path) -> dict[str, Any] | None:
    """Return the validated contents of the ledger file, or None when it does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as error:
        raise _corrupted(path, f"not UTF-8 text: {error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise _corrupted(path, f"invalid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
        raise _corrupted(path, f"not a dpfedseg privacy ledger (no \"format\": \"{LEDGER_FORMAT}\")")
    version = data.get("format_version")
    if isinstance(version, int) and version > LEDGER_FORMAT_VERSION:
        raise ValueError(
            f"privacy ledger {path} has format_version {version}, newer than the "
            f"{LEDGER_FORMAT_VERSION} this dpfedseg reads; upgrade dpfedseg to read it"
        )
    if version != LEDGER_FORMAT_VERSION:
        raise _corrupted(path, f"invalid format_version {version!r}")
    try:
        return _parse_contents(data)
    except ValueError as error:
        raise _corrupted(path, str(error)) from None


def _parse_contents(data: dict[str, Any]) -> dict[str, Any]:
    delta = data.get("delta")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise ValueError(f"'delta' must be a number in (0, 1), got {delta!r}")
    target = data.get("target_epsilon")
    if target is not None and (
        isinstance(target, bool) or not isinstance(target, (int, float)) or not target > 0
    ):
        raise ValueError(f"'target_epsilon' must be a positive number or null, got {target!r}")
    accountant = data.get("accountant")
    if accountant is not None and accountant not in ACCOUNTANTS:
        raise ValueError(f"'accountant' must be one of {', '.join(ACCOUNTANTS)} or null, got {accountant!r}")
    raw_entries = data.get("entries")
    if not isinstance(raw_entries, list):
        raise ValueError(f"'entries' must be a list, got {raw_entries!r}")
    entries = []
    for index, raw in enumerate(raw_entries):
        try:
            entries.append(LedgerEntry.from_dict(raw))
        except (TypeError, ValueError) as error:
            raise ValueError(f"entry {index}: {error}") from None
    return {
        "delta": float(delta),
        "target_epsilon": None if target is None else float(target),
        "accountant": accountant,
        "entries": tuple(entries),
    }


def _corrupted(path: Path, detail: str) -> ValueError:
    return ValueError(
        f"privacy ledger {path} is unreadable: {detail}. Restore it from a backup; deleting it "
        "would reset this site's spent epsilon to 0 and under-report its privacy loss"
    )


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` so read-append-write runs in one process at a time.

    Locking the folder rather than a lock file leaves nothing behind on disk.
    """
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


ROUND_LOCK_FILE = ".round.lock"
"""File in a site folder that :func:`site_round_lock` locks (it is empty)."""


@contextmanager
def site_round_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a site folder for one round, from reading its ledger to recording.

    Two processes training one site at once would each check the budget against the
    ledger as it was before either recorded, so together they could pass the target.
    A simulation seeded from the ledger would also draw the same noise twice. A second
    process therefore waits here until the first has recorded its round. The lock is
    on :data:`ROUND_LOCK_FILE`, because :meth:`PrivacyLedger.record` locks the folder
    itself within the round.
    """
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder / ROUND_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning(
                "site folder %s is in use by another process; waiting until its round is "
                "recorded (run one process per site folder)",
                folder,
            )
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)
