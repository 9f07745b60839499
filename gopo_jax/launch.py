"""`train(config, workdir)`: what every entry point calls to produce a run's summary. A config's method is trained
by the trainer (`gopo_jax.train.driver`); `method=prompted` (a chat model behind an endpoint) is evaluated on the
same customers by `gopo_jax.clients.prompted_eval` instead, since there is nothing to train."""
from __future__ import annotations


def train(config, workdir) -> dict:
    if config.method == "prompted":
        from gopo_jax.clients.prompted_eval import evaluate_prompted  # noqa: PLC0415  (no JAX training stack needed)
        return evaluate_prompted(config, workdir)
    from gopo_jax.train.driver import train_run  # noqa: PLC0415  (heavy: JAX, models)
    return train_run(config, workdir)
