"""GOPO on tmallbrand (a host environment on the real data in ../shared/data).

    python -m experiments.tmallbrand --config configs/tmallbrand.py --workdir runs/tmallbrand
"""
from experiments.common import define_flags, run_main
from gopo_jax.launch import train

define_flags("configs/tmallbrand.py")

if __name__ == "__main__":
    run_main(train)
