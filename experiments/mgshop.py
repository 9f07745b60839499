"""GOPO on the e-commerce world (default: the embedded synthetic shop; no files needed): `gopo-train` with
configs/mgshop.py as the default `--config`.

    python -m experiments.mgshop --config configs/mgshop.py --workdir runs/mgshop
"""
from experiments import train

if __name__ == "__main__":
    train.cli("mgshop.py")
