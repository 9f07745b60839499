"""gopo-jax: Goal-Oriented Preference Optimization for dual-agent (Expert + Customer-Service) dialogue, in JAX/Flax."""
