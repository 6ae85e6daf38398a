"""Quality metrics against the full cache: log-softmax, KL divergence per token, and KldScorer
(loads an edited KV state into a stock context and scores the next tokens)."""

from __future__ import annotations

import numpy as np

from . import _internals, kvstate

__all__ = ["log_softmax", "kld_per_token", "KldScorer"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def kld_per_token(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(P_ref || P) per token, nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


class KldScorer:
    """Scores KV-state edits: a stock context holds `context` tokens; `kld(state)` loads an
    edited state and returns the KLD of the next `scored` tokens against the unedited cache."""

    def __init__(self, llm, context: list[int], scored: list[int]):
        self.llm = llm
        self.context = list(context)
        self.scored = list(scored)
        llm.reset()
        llm.eval(self.context)
        self.blob = _internals.seq_state(llm)
        self.state = kvstate.parse_seq_state(self.blob)
        self.ref = self._score()

    def _score(self) -> np.ndarray:
        self.llm.n_tokens = len(self.context)
        return _internals.eval_logits(self.llm, self.scored)

    def logits(self, state: kvstate.SeqState) -> np.ndarray:
        _internals.set_seq_state(self.llm, kvstate.serialize_seq_state(state))
        return self._score()

    def kld(self, state: kvstate.SeqState) -> float:
        return float(kld_per_token(self.ref, self.logits(state)).mean())
