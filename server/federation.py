"""The server's round loop: sample sites, train, verify privacy, average, evaluate, save.

It follows the order of Flower's ``Strategy.start`` but adds what a private federation
needs: sites whose budget is spent are no longer sampled, the run stops when every
budget is spent, and every round ends with its rows, ledgers and a checkpoint on disk,
so a stopped server resumes at the next round.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import federation as fed
from common.config import RunConfig
from common.privacy.sparse_upload import decode_update, round_mask, weight_shapes
from common.results import STATUS_FAILED, STATUS_NOT_SAMPLED, STATUS_OK, STATUS_REFUSED
from server.aggregate import average_by_site
from server.replies import TrainReply, parse_evaluate_replies, parse_train_replies
from server.run_folder import RunFolder
from server.tracker import SiteTracker

log = logging.getLogger(__name__)

NODE_WAIT_SECONDS = 600  # how long round 1 waits for num-sites SuperNodes to connect


@dataclass
class FederationResult:
    """The outcome of a finished or stopped run."""

    weights: dict[str, np.ndarray]
    last_round: int
    stop_reason: str
    max_epsilon: float


def run_federation(
    grid: Any,
    config: RunConfig,
    *,
    initial_weights: Mapping[str, np.ndarray],
    folder: RunFolder,
) -> FederationResult:
    """Run (or resume) the federated rounds of ``config`` on ``grid``."""
    tracker = SiteTracker(
        delta=config.delta, target_epsilon=config.target_epsilon, accountant=config.accountant
    )
    node_sites: dict[int, int] = {}
    weights = dict(initial_weights)
    first_round = 1
    checkpoint = folder.load_checkpoint() if config.resume else None
    if checkpoint is not None:
        weights = checkpoint["weights"]
        first_round = checkpoint["server_round"] + 1
        tracker.load_state_dict(checkpoint["tracker"])
        node_sites.update(checkpoint["node_sites"])
        folder.truncate_rows(checkpoint["server_round"])
        log.info("resuming from the checkpoint of round %d", checkpoint["server_round"])
    else:
        folder.truncate_rows(0)
    folder.write_config(config)

    last_round = first_round - 1
    stop_reason = "all rounds done"
    for server_round in range(first_round, config.num_server_rounds + 1):
        if config.private and tracker.all_spent(config.num_sites):
            stop_reason = "every site's privacy budget is spent"
            break
        started = time.monotonic()
        nodes = _wait_for_nodes(grid, config.num_sites if server_round == first_round else 1)
        _learn_sites(grid, config, nodes, node_sites)
        sampled = sample_nodes(nodes, tracker.excluded_nodes(), config, server_round, node_sites)
        if not sampled:
            stop_reason = "no site with privacy budget left is connected"
            break
        train = _train_round(grid, config, server_round, weights, sampled, node_sites)
        _check_some_site_answered(train, server_round, folder, last_round)
        _track_privacy(tracker, train, server_round)
        accepted = [r for r in train if r.status == STATUS_OK]
        if accepted:
            weights = average_by_site(
                [r.site for r in accepted], [r.weights for r in accepted], [r.num_examples for r in accepted]
            )
        evaluation = _evaluate_round(grid, config, server_round, weights, nodes, train, node_sites)
        seconds = time.monotonic() - started
        rows = _round_rows(config, server_round, train, evaluation, tracker, seconds)
        folder.append_rows(rows)
        folder.write_ledgers(tracker.state_dict())
        folder.save_checkpoint(
            server_round=server_round,
            weights=weights,
            tracker_state=tracker.state_dict(),
            node_sites=node_sites,
        )
        folder.write_status(complete=False, last_round=server_round, stop_reason="running")
        last_round = server_round
        _log_round(config, server_round, train, rows, tracker, seconds)

    folder.write_final_model(weights)
    folder.write_status(complete=True, last_round=last_round, stop_reason=stop_reason)
    log.info(
        "run finished after round %d (%s); max epsilon %.3f (%s, delta=%g)",
        last_round, stop_reason, tracker.max_epsilon(), config.accountant, config.delta,
    )
    return FederationResult(weights, last_round, stop_reason, tracker.max_epsilon())


def _check_some_site_answered(
    train: list[TrainReply], server_round: int, folder: RunFolder, last_round: int
) -> None:
    """Stop the run, marked unfinished, when every sampled site failed this round.

    A round in which no site trained or refused changes nothing. Going on would
    finish a run that never trained (and report epsilon 0); a site's error (bad data,
    a bad setting) usually repeats every round.
    """
    if any(reply.status != STATUS_FAILED for reply in train):
        return
    reason = f"every sampled site failed in round {server_round}"
    folder.write_status(complete=False, last_round=last_round, stop_reason=reason)
    details = "; ".join(f"site {r.site}: {r.reason}" for r in train[:3])
    then = "rerun" if last_round == 0 else f"rerun with resume = true to continue after round {last_round}"
    raise RuntimeError(f"{reason} ({details}); fix the cause, then {then}")


def _wait_for_nodes(grid: Any, minimum: int) -> list[int]:
    deadline = time.monotonic() + NODE_WAIT_SECONDS
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"only {len(nodes)} of {minimum} sites connected within {NODE_WAIT_SECONDS} s; "
                "check that every SuperNode is running and reaches the SuperLink"
            )
        log.info(
            "waiting for sites: %d of %d connected (one SuperNode per site; in simulation "
            "Flower's num-supernodes must be at least num-sites)", len(nodes), minimum,
        )
        time.sleep(2)


def sample_nodes(
    nodes: list[int], excluded: set[int], config: RunConfig, server_round: int, node_sites: Mapping[int, int]
) -> list[int]:
    """Return the node ids to train this round: a seeded sample of the eligible sites.

    Flower gives SuperNodes new random ids in every run, so the sample is drawn from the
    eligible nodes ordered by their site id (unknown sites last): the same seed samples
    the same sites in every run.
    """
    def site_order(node: int) -> tuple[bool, int, int]:
        return node not in node_sites, node_sites.get(node, 0), node

    eligible = sorted((n for n in nodes if n not in excluded), key=site_order)
    if not eligible:
        return []
    count = max(1, round(config.fraction_train * len(eligible)))
    rng = random.Random(config.seed * 100_003 + server_round)
    return sorted(rng.sample(eligible, count))


def _to_array_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def _messages(weights, node_ids, server_round: int, message_type: str) -> list[Message]:
    record_arrays = _to_array_record(weights)
    return [
        Message(
            content=RecordDict(
                {
                    fed.ARRAYS_KEY: record_arrays,
                    fed.CONFIG_KEY: ConfigRecord({"server-round": server_round}),
                }
            ),
            message_type=message_type,
            dst_node_id=node_id,
        )
        for node_id in node_ids
    ]


def _learn_sites(grid, config: RunConfig, nodes: list[int], node_sites: dict[int, int]) -> None:
    """Ask nodes not seen before for their site id (a restarted SuperNode gets a new id)."""
    unknown = [n for n in nodes if n not in node_sites]
    if not unknown:
        return
    messages = [
        Message(content=RecordDict({}), message_type=MessageType.QUERY, dst_node_id=node_id)
        for node_id in unknown
    ]
    for reply in grid.send_and_receive(messages, timeout=min(config.round_timeout, 120)):
        if reply.has_error():
            log.warning("node %s did not report its site: %s", reply.metadata.src_node_id, str(reply.error.reason)[-300:])
            continue
        node_sites[int(reply.metadata.src_node_id)] = int(reply.content[fed.METRICS_KEY][fed.SITE])
    log.info("sites by node: %s", {n: node_sites.get(n) for n in nodes})


def _train_round(grid, config, server_round, weights, sampled, node_sites) -> list[TrainReply]:
    messages = _messages(weights, sampled, server_round, MessageType.TRAIN)
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    parsed = parse_train_replies(replies, sampled, node_sites)
    for reply in parsed:
        if reply.status == STATUS_OK and reply.upload == fed.UPLOAD_SPARSE:
            _densify(reply, weights, config, server_round)
    return parsed


def _densify(reply: TrainReply, weights, config: RunConfig, server_round: int) -> None:
    """Rebuild a sparse RS upload into full weights with the round's mask for that site."""
    mask = round_mask(config, weight_shapes(weights), server_round=server_round, site=reply.site)
    try:
        reply.weights = decode_update(
            weights, reply.weights[fed.SPARSE_VALUES], mask,
            digest=reply.weights[fed.SPARSE_MASK_DIGEST],
        )
    except (KeyError, ValueError) as error:
        reply.status = STATUS_FAILED
        reply.reason = f"invalid sparse upload: {error}"
        reply.weights = None


def _evaluate_round(grid, config, server_round, weights, nodes, train, node_sites):
    failed = {r.node_id for r in train if r.status == STATUS_FAILED}
    targets = [n for n in nodes if n not in failed]
    messages = _messages(weights, targets, server_round, MessageType.EVALUATE)
    replies = list(grid.send_and_receive(messages, timeout=config.round_timeout))
    for message in replies:
        if message.has_error():
            log.warning(
                "round %d: evaluation failed on node %s: %s",
                server_round, message.metadata.src_node_id, str(message.error.reason)[-300:],
            )
    return parse_evaluate_replies(replies, node_sites)


def _track_privacy(tracker: SiteTracker, train: list[TrainReply], server_round: int) -> None:
    for reply in train:
        if reply.status == STATUS_OK:
            epsilon_server, mismatch = tracker.observe_train(
                site=reply.site,
                node_id=reply.node_id,
                entries=reply.entries,
                epsilon_reported=float(reply.metrics.get("epsilon", 0.0)),
            )
            reply.metrics["epsilon_server"] = epsilon_server
            if mismatch:
                reply.reason = mismatch
            count = int(reply.metrics.get("round_entries", 0))
            tracker.forecast_next_round(reply.site, reply.entries[len(reply.entries) - count :] if count else [])
        elif reply.status == STATUS_REFUSED:
            tracker.mark_refused(reply.site, reply.node_id, reply.reason)
            if reply.entries:
                tracker.observe_train(
                    site=reply.site,
                    node_id=reply.node_id,
                    entries=reply.entries,
                    epsilon_reported=float(reply.metrics.get("epsilon", 0.0)),
                )


def _round_rows(config, server_round, train, evaluation, tracker, seconds) -> list[dict]:
    rows = []
    seen = set()
    for reply in train:
        seen.add(reply.site)
        state = tracker.sites.get(reply.site)
        row = {
            "server_round": server_round,
            "site": reply.site,
            "status": reply.status,
            "reason": reply.reason,
            "method": config.method,
            "num_examples": reply.num_examples or np.nan,
            "accountant": config.accountant,
            "delta": config.delta,
            "round_seconds": seconds,
            **{k: v for k, v in reply.metrics.items() if k not in ("round_entries", "delta")},
        }
        if state is not None:
            row["epsilon_server"] = state.epsilon_server
            row.setdefault("epsilon", state.epsilon_reported)
        row.update(evaluation.get(reply.site, {}))
        rows.append(row)
    for site, metrics in sorted(evaluation.items()):
        if site in seen:
            continue
        state = tracker.sites.get(site)
        rows.append(
            {
                "server_round": server_round,
                "site": site,
                "status": STATUS_NOT_SAMPLED,
                "reason": state.exhausted if state else "",
                "method": config.method,
                "accountant": config.accountant,
                "delta": config.delta,
                "epsilon": state.epsilon_reported if state else 0.0,
                "epsilon_server": state.epsilon_server if state else 0.0,
                "round_seconds": seconds,
                **metrics,
            }
        )
    return sorted(rows, key=lambda r: r["site"])


def _log_round(config, server_round, train, rows, tracker, seconds) -> None:
    def sites(status: str) -> str:
        return ",".join(str(r.site) for r in train if r.status == status) or "-"

    failures = "; ".join(f"site {r.site} (node {r.node_id}): {r.reason}" for r in train if r.status == STATUS_FAILED)
    per_site = " ".join(
        f"{site}:{max(s.epsilon_server, s.epsilon_reported):.3f}" for site, s in sorted(tracker.sites.items())
    )
    ok_rows = [r for r in rows if r["status"] == STATUS_OK]
    loss = _weighted(ok_rows, "train_loss", "num_examples")
    dice = _weighted([r for r in rows if "val_dice" in r], "val_dice", None)
    dice_positive = _weighted(
        [r for r in rows if np.isfinite(r.get("val_dice_positive", np.nan))], "val_dice_positive", None
    )
    log.info(
        "round %d/%d: sampled %s, replied %s, failed %s, refused %s | epsilon per site %s, "
        "max %.3f (%s, delta=%g) | train loss %s | val Dice %s (positive images %s) | %.1f s",
        server_round, config.num_server_rounds, ",".join(str(s) for s in sorted(r.site for r in train)),
        sites(STATUS_OK), sites(STATUS_FAILED), sites(STATUS_REFUSED), per_site or "-",
        tracker.max_epsilon(), config.accountant, config.delta,
        "-" if loss is None else f"{loss:.4f}", "-" if dice is None else f"{dice:.4f}",
        "-" if dice_positive is None else f"{dice_positive:.4f}", seconds,
    )
    if failures:
        log.warning("round %d failures: %s", server_round, failures)


def _weighted(rows: list[dict], key: str, weight_key: str | None) -> float | None:
    pairs = [(float(r[key]), float(r.get(weight_key, 1.0)) if weight_key else 1.0) for r in rows if key in r]
    total = sum(w for _, w in pairs)
    return None if not pairs or total <= 0 else sum(v * w for v, w in pairs) / total
