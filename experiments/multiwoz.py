"""GOPO on multiwoz (a host environment on the real data in ../shared/data).

    python -m experiments.multiwoz --config configs/multiwoz.py --workdir runs/multiwoz
"""
from experiments.common import define_flags, run_main
from gopo_jax.launch import train

define_flags("configs/multiwoz.py")

if __name__ == "__main__":
    run_main(train)
