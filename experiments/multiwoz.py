"""GOPO on multiwoz (a host environment on the real data in ../shared/data): `gopo-train` with configs/multiwoz.py
as the default `--config`.

    python -m experiments.multiwoz --config configs/multiwoz.py --workdir runs/multiwoz
"""
from experiments import train

if __name__ == "__main__":
    train.cli("multiwoz.py")
