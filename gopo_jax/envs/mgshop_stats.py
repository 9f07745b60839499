"""What the MG-ShopDial world fits from the logged wizard turns: the engagement (c_t) and relevance (rel_t) tables,
and the strategy classifier behind the realisation check R (rules and fitted numbers: gopo_jax/envs/mgshop.py).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from gopo_jax.dialogue.sop import SOP
from gopo_jax.envs.mgshop_data import Conversation, logged_stages, top_client_intent

_C_PRIOR, _REL_PRIOR = 4.0, 2.0


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Engagement and relevance tables fitted from logged wizard turns (see the module doc)."""

    cont: np.ndarray  # f32[n_stages, n_k]: P(no nf next | stage, strategy)
    cont_violation: float
    cont_unrecognised: float
    cont_global: float
    next_strategy: dict  # (stage, client intent) -> f64[n_k] smoothed p(k | stage, intent), zero where disallowed
    stage_prior: np.ndarray  # f64[n_stages, n_k] p(k | stage) over allowed strategies


def _beta_mean(pos: float, n: float, prior_mean: float, strength: float) -> float:
    return (pos + strength * prior_mean) / (n + strength)


def fit_statistics(conversations: Sequence[Conversation], sop: SOP, labels: dict[int, list[int | None]]) -> Statistics:
    """c_t and rel_t tables from the logged turns of `conversations` (labels[i] = strategy per turn of conv i)."""
    n_s, n_k = sop.num_stages, sop.num_strategies
    pos, tot = np.zeros((n_s, n_k)), np.zeros((n_s, n_k))
    viol_pos = viol_tot = unrec_pos = unrec_tot = 0.0
    ctx_counts: dict[tuple[int, str], np.ndarray] = {}
    for i, conv in enumerate(conversations):
        ks = labels[i]
        for s, k, turn in zip(logged_stages(sop, conv, ks), ks, conv.turns):
            engaged = float("nf" not in turn.response_intents)
            if k is None:
                unrec_pos, unrec_tot = unrec_pos + engaged, unrec_tot + 1
            elif not sop.allowed[s, k]:
                viol_pos, viol_tot = viol_pos + engaged, viol_tot + 1
            else:
                pos[s, k] += engaged
                tot[s, k] += 1
                key = (s, top_client_intent(turn.intents_before))
                ctx_counts.setdefault(key, np.zeros(n_k))[k] += 1
    glob = _beta_mean(pos.sum(), tot.sum(), 0.5, 2.0)
    per_k = [_beta_mean(pos[:, k].sum(), tot[:, k].sum(), glob, _C_PRIOR) for k in range(n_k)]
    cont = np.array([[_beta_mean(pos[s, k], tot[s, k], per_k[k], _C_PRIOR) for k in range(n_k)]
                     for s in range(n_s)], np.float32)
    allowed = sop.allowed.astype(np.float64)
    stage_prior = (tot + 0.5) * allowed
    stage_prior /= np.maximum(stage_prior.sum(1, keepdims=True), 1e-12)
    next_strategy = {key: (c + _REL_PRIOR * stage_prior[key[0]]) * allowed[key[0]] / (c.sum() + _REL_PRIOR)
                     for key, c in ctx_counts.items()}
    return Statistics(cont=cont, cont_violation=_beta_mean(viol_pos, viol_tot, glob, _C_PRIOR),
                      cont_unrecognised=_beta_mean(unrec_pos, unrec_tot, glob, _C_PRIOR), cont_global=glob,
                      next_strategy=next_strategy, stage_prior=stage_prior)


def strategy_probabilities(stats: Statistics, stage: int, client_intent: str) -> np.ndarray:
    return stats.next_strategy.get((stage, client_intent), stats.stage_prior[stage])


def relevance_grades(probs: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """rel per strategy: 3 for the most likely allowed strategy, 2 for the next two, 1 for other allowed, 0 else."""
    order = [k for k in np.argsort(-probs, kind="stable") if allowed[k]]
    grades = np.zeros(len(probs), np.int32)
    for r, k in enumerate(order):
        grades[k] = 3 if r == 0 else 2 if r < 3 else 1
    return grades



@dataclasses.dataclass(frozen=True)
class StrategyClassifier:
    """Multinomial logistic regression on sentence embeddings; `predict_proba(X[N,D]) -> P[N,n_k]`."""

    weights: np.ndarray  # f64[D+1, n_k] (last row: bias)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, num_classes: int, *, l2: float = 1e-3, steps: int = 500,
            lr: float = 2.0, balanced: bool = True) -> "StrategyClassifier":
        """Full-batch gradient descent from zeros: deterministic, convex, no randomness to seed.

        `balanced` weighs each class equally; without it the rare strategies (pf: 4% of the labels) are never
        predicted, so no reply could realise them.
        """
        xb = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
        onehot = np.eye(num_classes)[y]
        counts = np.bincount(y, minlength=num_classes).astype(np.float64)
        sample_w = (len(y) / (num_classes * np.maximum(counts, 1.0)))[y] if balanced else np.ones(len(y))
        w = np.zeros((xb.shape[1], num_classes))
        for _ in range(steps):
            p = _softmax(xb @ w)
            grad = xb.T @ ((p - onehot) * sample_w[:, None]) / len(x) + l2 * np.concatenate(
                [w[:-1], np.zeros((1, num_classes))])
            w -= lr * grad
        return cls(weights=w)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return _softmax(np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1) @ self.weights)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nearest_centroid_predict(x_train: np.ndarray, y_train: np.ndarray, x: np.ndarray, num_classes: int) -> np.ndarray:
    """The simpler baseline classifier reported next to the logistic regression."""
    centroids = np.stack([x_train[y_train == k].mean(0) if np.any(y_train == k) else np.zeros(x.shape[1])
                          for k in range(num_classes)])
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return np.argmax(x @ centroids.T, axis=1)

