"""A plain PyTorch training script: a small MLP on scikit-learn's bundled 8x8 digits.

    python examples/from_a_script/train.py

task.py turns it into a secagg task without changing a line of it.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def load_data() -> tuple[TensorDataset, TensorDataset]:
    """(train, test): 1,400 and 397 digits, pixels scaled to [0, 1]."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def train(
    model: nn.Module, loader: DataLoader, epochs: int, lr: float, device: torch.device
) -> float:
    """Train in place with SGD; return the mean loss of the last epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        total, seen = 0.0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
    return total / seen


@torch.no_grad()
def test(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over ``loader``."""
    model.eval()
    loss, correct, seen = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return loss / seen, correct / seen


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    train_set, test_set = load_data()
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=256)
    model = Net().to(device)
    for epoch in range(1, 11):
        train_loss = train(model, train_loader, epochs=1, lr=0.05, device=device)
        test_loss, accuracy = test(model, test_loader, device)
        print(f"epoch {epoch}: train {train_loss:.3f}, test {test_loss:.3f}, acc {accuracy:.3f}")


if __name__ == "__main__":
    main()
