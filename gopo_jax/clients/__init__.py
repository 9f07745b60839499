"""Clients of external model services: an OpenAI-compatible chat client and a prompted-model CS agent built on it
(the prompt-only large-model baselines of GOPO.md §4)."""
