"""Write scikit-learn's bundled breast-cancer data as CSV files, one folder per site.

    python examples/tabular/prepare.py                 # examples/tabular/data/site-1 .. site-3
    python examples/tabular/prepare.py --sites 5 --out /tmp/bc

Each site gets ``train.csv`` and ``test.csv`` (30 feature columns, then ``target``: 1 benign,
0 malignant): a stratified quarter of the 569 rows is held out for testing, and both parts are
dealt out to the sites in turn. Nothing is downloaded: the data ships with scikit-learn.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def write_csvs(out: Path, sites: int = 3, seed: int = 0) -> list[Path]:
    """Write ``out/site-N/{train,test}.csv`` for N = 1 .. sites; return the site folders."""
    data = load_breast_cancer()
    header = [name.replace(" ", "_") for name in data.feature_names] + ["target"]
    rows = np.column_stack([data.data, data.target])
    train, test = train_test_split(rows, test_size=0.25, stratify=data.target, random_state=seed)
    folders = []
    for i in range(sites):
        folder = out / f"site-{i + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in (("train.csv", train), ("test.csv", test)):
            with open(folder / name, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(part[i::sites].tolist())
        folders.append(folder)
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "data", help="default: %(default)s")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for folder in write_csvs(args.out, args.sites, args.seed):
        print(f"wrote {folder}/train.csv and test.csv")


if __name__ == "__main__":
    main()
