from gopo_jax.serve import cli

cli()
