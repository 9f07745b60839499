"""Sweep configs (`python -m experiments.sweep --config configs/sweeps/<name>.py`): a base run config, fixed
overrides and a grid of values, each file a `get_config()` that returns a locked ConfigDict."""
