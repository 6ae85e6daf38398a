"""Quality metrics against the full cache: log-softmax, KL divergence per token, and KldScorer
(loads an edited KV state into a stock context and scores the next tokens)."""

from __future__ import annotations

import time

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
    edited state and returns the KLD of the next `scored` tokens against the unedited cache.
    `probes` are other named continuations of the same context (e.g. a span of the context
    repeated, which the model must copy from far back); `klds(state)` scores all of them."""

    def __init__(self, llm, context: list[int], scored: list[int], probes: dict | None = None, stock=None,
                 layer_groups=None):
        """stock: SeqState -> SeqState, what the cache being simulated holds instead of the
        captured rows (alignment.CacheSim.stock); the references are scored on it. layer_groups:
        the model's KV caches' layers (ModelInfo.cache_layers(); needed for sliding-window models)."""
        self.llm = llm
        self.context = list(context)
        self.continuations = {"next": list(scored), **{k: list(v) for k, v in (probes or {}).items()}}
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.context)
        #: seconds the context's prefill took
        self.prefill_seconds = time.perf_counter() - t0
        self.blob = _internals.seq_state(llm)
        self.state = kvstate.parse_seq_state(self.blob, layer_groups)
        #: the unquantized model's logits (a simulated stock cache only): what klds_added measures against
        self.exact_state, self.exact_refs, self.base = None, None, None
        if stock is not None:
            self.exact_state = self.state
            self.exact_refs = {k: self._score(v) for k, v in self.continuations.items()}
            self.state = stock(self.state)
            self.blob = kvstate.serialize_seq_state(self.state)
            _internals.set_seq_state(llm, self.blob)
        self.refs = {k: self._score(v) for k, v in self.continuations.items()}
        self.ref = self.refs["next"]
        if stock is not None:
            #: the stock cache type's own mean KLD against the unquantized model, per continuation
            self.base = {k: float(kld_per_token(self.exact_refs[k], self.refs[k]).mean()) for k in self.refs}

    @property
    def scored(self) -> list[int]:
        return self.continuations["next"]

    def _score(self, tokens: list[int]) -> np.ndarray:
        self.llm.n_tokens = len(self.context)
        return _internals.eval_logits(self.llm, tokens)

    def logits(self, state: kvstate.SeqState, which: str = "next") -> np.ndarray:
        _internals.set_seq_state(self.llm, kvstate.serialize_seq_state(state))
        return self._score(self.continuations[which])

    def kld(self, state: kvstate.SeqState) -> float:
        return float(kld_per_token(self.ref, self.logits(state)).mean())

    def klds(self, state: kvstate.SeqState) -> dict:
        """Mean KLD of every continuation (the state is loaded once)."""
        _internals.set_seq_state(self.llm, kvstate.serialize_seq_state(state))
        return {k: float(kld_per_token(self.refs[k], self._score(v)).mean()) for k, v in self.continuations.items()}

    def klds_added(self, state: kvstate.SeqState) -> dict:
        """A simulated stock cache only: what an edit adds to the stock type's own error, per
        continuation: mean KLD against the unquantized model's logits, minus the stock cache's."""
        if self.exact_refs is None:
            raise ValueError("klds_added needs a scorer made with stock= (a simulated cache type)")
        _internals.set_seq_state(self.llm, kvstate.serialize_seq_state(state))
        return {k: float(kld_per_token(self.exact_refs[k], self._score(v)).mean()) - self.base[k]
                for k, v in self.continuations.items()}
