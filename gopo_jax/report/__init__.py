"""Comparison reports: per-run summaries -> results tables (results.json / results.md) and the paper's figures.

`tables` aggregates finished runs (one `summary.json` per method × environment × seed) into means with 95%
intervals over seeds and GOPO's paired relative differences; `figures` draws the Figure 1 and Figure 3 analogues.
"""
