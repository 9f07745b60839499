"""GOPO on the e-commerce world (default: the embedded synthetic shop; no files needed).

    python -m experiments.mgshop --config configs/mgshop.py --workdir runs/mgshop
"""
from experiments.common import define_flags, run_main
from gopo_jax.launch import train

define_flags("configs/mgshop.py")

if __name__ == "__main__":
    run_main(train)
