"""train.py as a secagg task: the script's data, model and loop, called from a Task in place of
its main(). train.py itself is unchanged.

Job files name it ``from_a_script.task:Digits`` with ``examples/`` on PYTHONPATH.
"""

from __future__ import annotations

from torch.utils.data import DataLoader, Subset

from from_a_script import train as script
from secagg import EvalResult, Task, TrainResult


class Digits(Task):
    def build_model(self):
        return script.Net()

    def load_data(self, site):
        train_set, test_set = script.load_data()
        if site.partition:  # a simulation: every site takes every clients-th example
            train_set = Subset(train_set, range(site.index, len(train_set), site.clients))
        return train_set, test_set

    def train(self, model, data, ctx):
        loader = DataLoader(data[0], batch_size=32, shuffle=True, generator=ctx.generator())
        loss = script.train(model, loader, ctx.config.local_epochs, ctx.config.lr, ctx.device)
        return TrainResult(num_samples=len(data[0]), metrics={"loss": loss})

    def evaluate(self, model, data, ctx):
        loss, accuracy = script.test(model, DataLoader(data[1], batch_size=256), ctx.device)
        return EvalResult(loss, num_samples=len(data[1]), metrics={"accuracy": accuracy})
