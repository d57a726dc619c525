"""The ClientApp: Flower's quickstart functions, unchanged, and one line for secagg's HE."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from flower_digits.task import Net, load_data, seed_of, test, train
from secagg.flower import he_mod

app = ClientApp(mods=[he_mod()])  # secagg: the one line (keys: the run config's secagg-keys)


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    net = Net(int(config.get("hidden", 32)))
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition = int(context.node_config["partition-id"])
    trainset, _ = load_data(partition, int(context.node_config["num-partitions"]))
    seed = seed_of(partition, int(config.get("server-round", 0)))
    loss = train(
        net, trainset, int(config.get("local-epochs", 1)), float(config.get("lr", 0.1)), seed
    )
    metrics = MetricRecord({"train_loss": loss, "num-examples": len(trainset[1])})
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    net = Net(int(msg.content["config"].get("hidden", 32)))
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    partition = int(context.node_config["partition-id"])
    _, testset = load_data(partition, int(context.node_config["num-partitions"]))
    loss, accuracy = test(net, testset)
    metrics = MetricRecord(
        {"eval_loss": loss, "eval_acc": accuracy, "num-examples": len(testset[1])}
    )
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


_ = torch  # the quickstart's import, kept
