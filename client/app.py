"""Flower ClientApp: one hospital site. Thin: parse, call :mod:`client.site`, pack the reply."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import federation as fed
from common.config import RunConfig
from common.runtime import setup_logging
from client.site import evaluate_global, site_id, train_round

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's shard with DP-SGD."""
    setup_logging()
    config = RunConfig.from_run_config(context.run_config)
    weights = _weights(msg)
    server_round = int(msg.content[fed.CONFIG_KEY]["server-round"])
    reply = train_round(config, dict(context.node_config), weights, server_round=server_round)
    content = {
        fed.METRICS_KEY: MetricRecord(reply.metrics),
        fed.INFO_KEY: ConfigRecord(reply.info),
    }
    if reply.weights is not None:
        content[fed.ARRAYS_KEY] = ArrayRecord(
            {k: Array(v) for k, v in reply.weights.items()}
        )
    return Message(RecordDict(content), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received global model on this site's validation and test splits."""
    setup_logging()
    config = RunConfig.from_run_config(context.run_config)
    metrics = evaluate_global(config, dict(context.node_config), _weights(msg))
    return Message(RecordDict({fed.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)


def _weights(msg: Message) -> dict:
    arrays = msg.content[fed.ARRAYS_KEY]
    return {key: arrays[key].numpy() for key in arrays.keys()}


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which site this node is, so failures can be reported by site."""
    metrics = {fed.SITE: site_id(dict(context.node_config))}
    return Message(RecordDict({fed.METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
