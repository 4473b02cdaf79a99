"""Turn the sites' train and evaluate replies into per-site rows (plain functions).

A reply is ok (weights, metrics and ledger), refused (budget spent, no weights) or
failed (a Flower error, or no reply before the timeout). Failed nodes are found by
comparing the node ids a round was sent to with the ids that replied, because a failed
reply may carry the SuperLink's id rather than the dead node's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from common import federation as fed
from common.results import STATUS_FAILED, STATUS_OK, STATUS_REFUSED


@dataclass
class TrainReply:
    """One site's reply to a train message."""

    node_id: int
    site: int
    status: str
    reason: str = ""
    num_examples: int = 0
    weights: dict[str, np.ndarray] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    entries: list[fed.WireEntry] = field(default_factory=list)
    accountant: str = ""
    method: str = ""
    upload: str = fed.UPLOAD_DENSE


def parse_train_replies(
    replies: list[Any], sent_node_ids: list[int], node_sites: dict[int, int]
) -> list[TrainReply]:
    """Classify Flower reply messages of one train round, one TrainReply per sent node.

    ``node_sites`` maps node ids to site ids learnt earlier and is updated from the
    replies; a node whose site is unknown gets site -1.
    """
    parsed: dict[int, TrainReply] = {}
    for message in replies:
        node_id = int(message.metadata.src_node_id)
        if message.has_error():
            # A failed reply may carry the SuperLink's id, so failures are matched below.
            continue
        reply = _parse_train_content(node_id, message.content)
        node_sites[node_id] = reply.site
        parsed[node_id] = reply
    errors = [m for m in replies if m.has_error()]
    matched = {int(m.metadata.src_node_id): str(m.error.reason) for m in errors}
    unmatched = [str(m.error.reason) for m in errors if int(m.metadata.src_node_id) not in sent_node_ids]
    out = []
    for node_id in sent_node_ids:
        if node_id in parsed:
            out.append(parsed[node_id])
            continue
        reason = matched.get(node_id) or (unmatched.pop(0) if unmatched else "")
        out.append(
            TrainReply(
                node_id=node_id,
                site=node_sites.get(node_id, -1),
                status=STATUS_FAILED,
                reason=_last_line(reason) or "no reply before the round timeout",
            )
        )
    return out


def parse_evaluate_replies(
    replies: Iterable[Any], node_sites: dict[int, int]
) -> dict[int, dict[str, float]]:
    """Return {site: evaluation metrics} for the replies without errors."""
    results: dict[int, dict[str, float]] = {}
    for message in replies:
        if message.has_error():
            continue
        metrics = dict(message.content[fed.METRICS_KEY])
        site = int(metrics[fed.SITE])
        node_sites[int(message.metadata.src_node_id)] = site
        results[site] = {k: float(metrics[k]) for k in fed.EVAL_METRIC_KEYS if k in metrics}
    return results


def _parse_train_content(node_id: int, content: Any) -> TrainReply:
    metrics = dict(content[fed.METRICS_KEY])
    info = dict(content[fed.INFO_KEY])
    site = int(metrics[fed.SITE])
    status = str(info.get(fed.INFO_STATUS, STATUS_OK))
    reply = TrainReply(
        node_id=node_id,
        site=site,
        status=status,
        reason=str(info.get(fed.INFO_REASON, "")),
        num_examples=int(metrics.get(fed.NUM_EXAMPLES, 0)),
        metrics={k: metrics[k] for k in fed.TRAIN_METRIC_KEYS if k in metrics},
        entries=fed.unpack_ledger(metrics),
        accountant=str(info.get(fed.INFO_ACCOUNTANT, "")),
        method=str(info.get(fed.INFO_METHOD, "")),
        upload=str(info.get(fed.INFO_UPLOAD, fed.UPLOAD_DENSE)),
    )
    if status == STATUS_OK:
        arrays = content[fed.ARRAYS_KEY]
        reply.weights = {key: arrays[key].numpy() for key in arrays.keys()}
    elif status != STATUS_REFUSED:
        raise ValueError(f"site {site} sent unknown status {status!r}")
    return reply


def _last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    # Ray wraps the client's exception; its last line carries the original message.
    return lines[-1][:500] if lines else ""
