"""A CSV task: breast-cancer rows, a small MLP (or logistic regression), ROC AUC and macro-F1
as its metrics (no accuracy: the job names ``auc`` as its headline metric).

Job files name it ``tabular.task:BreastCancer`` with ``examples/`` on PYTHONPATH.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secagg import EvalResult, RoundContext, Site, Task, TrainResult

FEATURES = 30


def site_folder(site: Site) -> Path:
    """``data_dir/<site name>`` in a simulation (every site's folder under one data_dir);
    ``data_dir`` itself on a real site, whose ``--data-dir`` is its own folder."""
    own = site.data_dir / site.name
    return own if own.is_dir() else site.data_dir


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features, labels) of a CSV whose last column is the 0/1 label."""
    rows = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32, ndmin=2)
    return rows[:, :-1], rows[:, -1]


class BreastCancer(Task):
    """Binary classification of tumours from 30 measurements. ``hidden = 0`` is logistic
    regression; otherwise one hidden layer of that width."""

    def __init__(self, hidden: int = 16):
        self.hidden = hidden

    def build_model(self) -> nn.Module:
        if self.hidden == 0:
            return nn.Linear(FEATURES, 1)
        return nn.Sequential(nn.Linear(FEATURES, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def load_data(self, site: Site) -> dict[str, TensorDataset]:
        folder = site_folder(site)
        if not (folder / "train.csv").is_file():
            raise FileNotFoundError(
                f"no {site.name}/train.csv nor train.csv in {site.data_dir}; "
                "run 'python examples/tabular/prepare.py'"
            )
        x_train, y_train = read_csv(folder / "train.csv")
        x_test, y_test = read_csv(folder / "test.csv")
        # Standardize with this site's own training statistics: they never leave the site.
        mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
        return {
            "train": TensorDataset(
                torch.from_numpy((x_train - mean) / std), torch.from_numpy(y_train)
            ),
            "test": TensorDataset(
                torch.from_numpy((x_test - mean) / std), torch.from_numpy(y_test)
            ),
        }

    def train(
        self, model: nn.Module, data: dict[str, TensorDataset], ctx: RoundContext
    ) -> TrainResult:
        loader = DataLoader(
            data["train"], batch_size=ctx.config.batch_size, shuffle=True, generator=ctx.generator()
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=ctx.config.lr)
        loss_fn = nn.BCEWithLogitsLoss()
        model.train()
        total, seen = 0.0, 0
        for _ in range(ctx.config.local_epochs):
            for x, y in loader:
                x, y = x.to(ctx.device), y.to(ctx.device)
                optimizer.zero_grad()
                loss = loss_fn(model(x).squeeze(1), y)
                loss.backward()
                optimizer.step()
                total, seen = total + loss.item() * len(y), seen + len(y)
        return TrainResult(num_samples=len(data["train"]), metrics={"loss": total / max(seen, 1)})

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: dict[str, TensorDataset], ctx: RoundContext
    ) -> EvalResult:
        x, y = (t.to(ctx.device) for t in data["test"].tensors)
        model.eval()
        logits = model(x).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        y_true, scores = y.cpu().numpy(), logits.cpu().numpy()
        truth, predicted = y_true > 0.5, scores > 0
        metrics = {"macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}
        if len(np.unique(y_true)) == 2:  # AUC needs both classes in this site's test set
            metrics["auc"] = float(roc_auc_score(y_true, scores))
        return EvalResult(loss=loss, num_samples=len(y_true), metrics=metrics)
