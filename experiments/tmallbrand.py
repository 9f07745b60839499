"""GOPO on tmallbrand (a host environment on the real data in ../shared/data): `gopo-train` with
configs/tmallbrand.py as the default `--config`.

    python -m experiments.tmallbrand --config configs/tmallbrand.py --workdir runs/tmallbrand
"""
from experiments import train

if __name__ == "__main__":
    train.cli("tmallbrand.py")
