"""Per-site privacy tracking on the server: recompute, verify, and stop spent sites.

The server never trusts a site's epsilon: it recomputes it from the ledger entries the
site sent, with the same accountant and delta, and flags any disagreement. Every record
lives at exactly one site, so the federation's sample-level guarantee is the maximum of
the per-site epsilons at the common delta.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from common.federation import WireEntry
from common.privacy.accounting import compute_epsilon
from common.privacy.ledger import LedgerEntry

log = logging.getLogger(__name__)

# Relative tolerance between the site's and the server's epsilon: both run the same
# accountant on the same entries, so anything above float noise is a real mismatch.
EPSILON_MATCH_RTOL = 1e-6


@dataclass
class SiteState:
    """The server's record of one site: node, ledger entries, epsilons and budget state."""

    site: int
    node_id: int | None = None
    entries: list[WireEntry] = field(default_factory=list)
    epsilon_reported: float = 0.0
    epsilon_server: float = 0.0
    exhausted: str = ""  # empty while the site may still train; else the reason


class SiteTracker:
    """Ledger entries, epsilons and budget state of every site seen in a run."""

    def __init__(self, *, delta: float, target_epsilon: float, accountant: str) -> None:
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.sites: dict[int, SiteState] = {}

    def site(self, site: int) -> SiteState:
        """Return the state of ``site``, creating it on first sight."""
        if site not in self.sites:
            self.sites[site] = SiteState(site=site)
        return self.sites[site]

    def epsilon_of(self, entries: Sequence[WireEntry]) -> float:
        """Return the epsilon of ``entries`` under this run's accountant and delta."""
        ledger_entries = [_to_ledger_entry(e) for e in entries]
        return compute_epsilon(ledger_entries, delta=self.delta, accountant=self.accountant)

    def observe_train(
        self, *, site: int, node_id: int, entries: Sequence[WireEntry], epsilon_reported: float
    ) -> tuple[float, str]:
        """Record a site's full ledger after a round; return (server epsilon, mismatch text).

        ``entries`` is the site's whole ledger. It must extend what the server saw before:
        a ledger that lost entries means the site's record was reset, which would
        under-report epsilon.
        """
        state = self.site(site)
        state.node_id = node_id
        problems = []
        if entries[: len(state.entries)] != state.entries:
            problems.append(
                f"site {site}'s ledger no longer starts with the {len(state.entries)} entries "
                "the server saw before (was its site directory reset?)"
            )
        state.entries = list(entries)
        state.epsilon_reported = float(epsilon_reported)
        state.epsilon_server = self.epsilon_of(state.entries)
        if not math.isclose(
            state.epsilon_server, state.epsilon_reported, rel_tol=EPSILON_MATCH_RTOL, abs_tol=1e-9
        ):
            problems.append(
                f"site {site} reported epsilon {state.epsilon_reported:.6f} but its ledger "
                f"gives {state.epsilon_server:.6f} ({self.accountant}, delta={self.delta:g})"
            )
        mismatch = "; ".join(problems)
        if mismatch:
            log.warning("privacy mismatch: %s", mismatch)
        return state.epsilon_server, mismatch

    def forecast_next_round(self, site: int, round_entries: Sequence[WireEntry]) -> None:
        """Mark ``site`` spent when one more round like ``round_entries`` would pass the target."""
        state = self.site(site)
        if not round_entries or state.exhausted:
            return
        next_epsilon = self.epsilon_of([*state.entries, *round_entries])
        if next_epsilon > self.target_epsilon:
            state.exhausted = (
                f"one more round would reach epsilon {next_epsilon:.3f} > target "
                f"{self.target_epsilon:g} ({self.accountant}, delta={self.delta:g})"
            )

    def mark_refused(self, site: int, node_id: int, reason: str) -> None:
        """Record that ``site`` refused a round because its budget is spent."""
        state = self.site(site)
        state.node_id = node_id
        state.exhausted = reason or "refused by the site"

    def excluded_nodes(self) -> set[int]:
        """Return the node ids of sites that must not be sampled again."""
        return {s.node_id for s in self.sites.values() if s.exhausted and s.node_id is not None}

    def all_spent(self, expected_sites: int) -> bool:
        """Return whether every one of ``expected_sites`` sites has spent its budget."""
        spent = [s for s in self.sites.values() if s.exhausted]
        return len(spent) >= expected_sites

    def max_epsilon(self) -> float:
        """Return the federation-wide epsilon: the maximum over sites (never under-reported)."""
        values = [max(s.epsilon_server, s.epsilon_reported) for s in self.sites.values()]
        return max(values, default=0.0)

    def state_dict(self) -> dict[str, Any]:
        """Return a JSON-safe snapshot for checkpoints."""
        return {
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": self.accountant,
            "sites": {str(k): asdict(v) for k, v in self.sites.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a snapshot written by :meth:`state_dict`."""
        for key in ("delta", "accountant"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"checkpoint was written with {key}={state[key]!r} but this run uses "
                    f"{getattr(self, key)!r}; resume with the same settings or start a new "
                    "output-dir"
                )
        self.sites = {}
        for key, value in state["sites"].items():
            entries = [WireEntry(**e) for e in value.pop("entries")]
            self.sites[int(key)] = SiteState(**value, entries=entries)


def _to_ledger_entry(entry: WireEntry) -> LedgerEntry:
    return LedgerEntry(
        noise_multiplier=entry.noise_multiplier,
        sample_rate=entry.sample_rate,
        steps=entry.steps,
        server_round=entry.server_round,
    )
