"""A task over torchvision's ImageFolder: each site's own folder of images, streamed from disk.

Job files name it ``image_folder.task:Shapes`` with ``examples/`` on PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import ImageFolder

from secagg import EvalResult, RoundContext, Site, Task, TrainResult


def site_folder(site: Site) -> Path:
    """``data_dir/<site name>`` in a simulation (every site's folder under one data_dir);
    ``data_dir`` itself on a real site, whose ``--data-dir`` is its own folder."""
    own = site.data_dir / site.name
    return own if own.is_dir() else site.data_dir


class FixedClasses(ImageFolder):
    """An ImageFolder whose label numbers come from the job, not from the sub-folders a site
    happens to have: ImageFolder numbers the folders it finds in sorted order, so a site
    missing one class would give every later class another site's label."""

    def __init__(self, root: Path, classes: list[str], **kwargs):
        self.fixed = list(classes)
        super().__init__(str(root), allow_empty=True, **kwargs)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self.fixed, {name: i for i, name in enumerate(self.fixed)}


class Shapes(Task):
    """Classify small images by their folder name with a small CNN. ``classes`` fixes the
    label order on every site; ``workers`` DataLoader processes read and decode the PNGs."""

    def __init__(
        self,
        classes: list[str] = ["circle", "square", "triangle"],  # noqa: B006  (never mutated)
        image_size: int = 32,
        workers: int = 0,
    ):
        self.classes = list(classes)
        self.image_size = image_size
        self.workers = workers

    def build_model(self) -> nn.Module:
        flat = 32 * (self.image_size // 4) ** 2
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, len(self.classes)),
        )  # fmt: skip

    def load_data(self, site: Site) -> dict[str, ImageFolder]:
        # An ImageFolder only lists file names; images are read batch by batch as loaders ask.
        preprocess = transforms.Compose(
            [transforms.Resize((self.image_size, self.image_size)), transforms.ToTensor()]
        )
        folder = site_folder(site)
        if not (folder / "train").is_dir():
            raise FileNotFoundError(
                f"no {site.name}/train/ nor train/ in {site.data_dir}; "
                "run 'python examples/image_folder/make_images.py'"
            )
        return {
            split: FixedClasses(folder / split, self.classes, transform=preprocess)
            for split in ("train", "test")
        }

    def train(
        self, model: nn.Module, data: dict[str, ImageFolder], ctx: RoundContext
    ) -> TrainResult:
        loader = self._loader(data["train"], ctx, shuffle=True)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=ctx.config.lr, momentum=ctx.config.momentum
        )
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        total, seen = 0.0, 0
        for _ in range(ctx.config.local_epochs):
            for images, labels in loader:
                images, labels = images.to(ctx.device), labels.to(ctx.device)
                optimizer.zero_grad()
                loss = loss_fn(model(images), labels)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(labels), seen + len(labels)
        return TrainResult(num_samples=len(data["train"]), metrics={"loss": total / max(seen, 1)})

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: dict[str, ImageFolder], ctx: RoundContext
    ) -> EvalResult | None:
        if len(data["test"]) == 0:
            return None  # a site without test images trains but does not evaluate
        model.eval()
        loss, correct = 0.0, 0
        for images, labels in self._loader(data["test"], ctx, shuffle=False):
            images, labels = images.to(ctx.device), labels.to(ctx.device)
            logits = model(images)
            loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
        n = len(data["test"])
        return EvalResult(loss=loss / n, num_samples=n, metrics={"accuracy": correct / n})

    def _loader(self, dataset: ImageFolder, ctx: RoundContext, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=ctx.config.batch_size,
            shuffle=shuffle,
            generator=ctx.generator() if shuffle else None,
            num_workers=self.workers,
            pin_memory=ctx.device.type == "cuda",
        )
