"""A synthetic digits-sized task for scale benchmarks: any number of clients, no data in memory.

Every client of the population owns ``examples_per_client`` examples (20 by default: 20,000
examples at 1,000 clients, 200,000 at 10,000). An example is an 8x8 one-channel image, its
class's prototype plus Gaussian noise, generated on demand from the job's seed and the
example's global index: ``load_data`` returns a ``torch.utils.data.Dataset`` that holds three
integers and a label mix, never the examples, so a client costs the same whatever the
population. Each client's label mix is Dirichlet(``alpha``), drawn from the seed and its index.
The model is the built-in digits MLP (``secagg.models``, 9,610 parameters). Client 0 holds the
test set (``test_examples``, generated the same way from a stream of its own) and evaluates.

    task = "bench.synthetic_task:SyntheticDigits"    # bench/ must be importable (PYTHONPATH)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import secagg
from secagg.models import build_model

SHAPE = (1, 8, 8)
CLASSES = 10
#: the test set's examples are numbered from here, apart from every client's
_TEST_STREAM = 1 << 40


def _prototypes(data_seed: int) -> np.ndarray:
    """One 8x8 pattern per class, the same on every client and in every job."""
    rng = np.random.default_rng([data_seed, 0x70])
    return rng.standard_normal((CLASSES, *SHAPE)).astype(np.float32)


class SyntheticExamples(Dataset[tuple[torch.Tensor, int]]):
    """``count`` examples numbered ``start`` .. ``start + count - 1``, made when read."""

    def __init__(
        self, seed: int, start: int, count: int, mix: np.ndarray, noise: float, data_seed: int
    ) -> None:
        self.seed, self.start, self.count = seed, start, count
        self.mix, self.noise = mix, noise
        self.prototypes = _prototypes(data_seed)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        rng = np.random.default_rng([self.seed, self.start + i])
        label = int(rng.choice(CLASSES, p=self.mix))
        image = self.prototypes[label] + self.noise * rng.standard_normal(SHAPE)
        return torch.from_numpy(image.astype(np.float32)), label


@dataclass
class SyntheticData:
    train: SyntheticExamples
    test: SyntheticExamples | None


class SyntheticDigits(secagg.Task):
    def __init__(
        self,
        examples_per_client: int = 20,
        test_examples: int = 500,
        alpha: float = 1.0,
        noise: float = 1.5,
        data_seed: int = 0,
    ) -> None:
        self.examples_per_client = examples_per_client
        self.test_examples = test_examples
        self.alpha, self.noise, self.data_seed = alpha, noise, data_seed

    def build_model(self) -> nn.Module:
        return build_model("mlp", SHAPE, CLASSES, torch.initial_seed())

    def load_data(self, site: secagg.Site) -> SyntheticData:
        mix = np.random.default_rng([site.seed, site.index, 0xA1]).dirichlet(
            np.full(CLASSES, self.alpha)
        )
        per = self.examples_per_client
        train = SyntheticExamples(site.seed, site.index * per, per, mix, self.noise, self.data_seed)
        test = None
        if site.index == 0:
            even = np.full(CLASSES, 1.0 / CLASSES)
            test = SyntheticExamples(
                site.seed, _TEST_STREAM, self.test_examples, even, self.noise, self.data_seed
            )
        return SyntheticData(train, test)

    def train(
        self, model: nn.Module, data: SyntheticData, ctx: secagg.RoundContext
    ) -> secagg.TrainResult:
        settings = ctx.config
        loader = DataLoader(
            data.train, settings.batch_size, shuffle=True, generator=ctx.generator()
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=settings.momentum)
        model.train()
        total, count = 0.0, 0
        for _ in range(settings.local_epochs):
            for x, y in loader:
                x, y = x.to(ctx.device), y.to(ctx.device)
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x), y)
                (loss + ctx.proximal(model)).backward()
                optimizer.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
        return secagg.TrainResult(len(data.train), {"loss": total / max(count, 1)})

    def evaluate(
        self, model: nn.Module, data: SyntheticData, ctx: secagg.RoundContext
    ) -> secagg.EvalResult | None:
        if data.test is None:
            return None
        model.eval()
        loss, correct = 0.0, 0
        with torch.no_grad():
            for x, y in DataLoader(data.test, 256):
                logits = model(x.to(ctx.device))
                y = y.to(ctx.device)
                loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
        n = len(data.test)
        return secagg.EvalResult(loss / n, n, {"accuracy": correct / n})
