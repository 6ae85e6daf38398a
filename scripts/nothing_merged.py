"""Nothing merged vs the stock cache of the same type: how far a merged configuration whose window
holds every token (so nothing is merged) moves each token's log-probability, next to the type's own
error vs f16. Prints one table (markdown).

    .venv/bin/python scripts/nothing_merged.py [--ctx 2048] [--scored 511] [--domains docs,legal]

Each row: one KV cache type; one text (corpus.eval_text) evaluated in prompt ubatches of 512, then
`--decode` single-token steps; the last `scored` tokens scored. Columns: max |Δ log p(next token)|
of the nothing-merged configuration vs the stock cache of that type over the prompt-scored and the
decoded tokens, KLD vs the stock type and vs f16, and the stock type's own error vs f16.
"""

from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np

from minicache_gguf import Llama, MergeConfig, corpus, default_model_path
from minicache_gguf.calfile import find_auto
from minicache_gguf.config import GGML_TYPES
from minicache_gguf.metrics import kld_per_token, log_softmax
from minicache_gguf.model import ModelInfo


def logits(model, toks, tk, tv, merge, n_ctx, flash, decode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a calibration scored on another type: said elsewhere
        llm = Llama(model, n_ctx=n_ctx, n_batch=512, n_ubatch=512, flash_attn=flash, logits_all=True, verbose=False,
                    type_k=GGML_TYPES[tk], type_v=GGML_TYPES[tv], kv_merge=merge)
    llm.eval(toks[:len(toks) - decode])  # prompt ubatches of 512
    for t in toks[len(toks) - decode:]:  # then decoding steps, one token each
        llm.eval([t])
    out = np.array(llm.scores[:len(toks)], dtype=np.float32)
    llm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--scored", type=int, default=511)
    ap.add_argument("--domains", default="docs,legal")
    ap.add_argument("--types", default="f16,f16-flash-off,q8_0,q4_0")
    ap.add_argument("--decode", type=int, default=32, help="the last N tokens are decoding steps (default 32)")
    args = ap.parse_args(argv)
    model = args.model or default_model_path()
    # the window covers the whole context: every token stays exact
    info = ModelInfo.of(model)

    def configs(t):
        # the shipped/cached selection for this type (f16's where there is none), its window widened
        cal = find_auto(info, MergeConfig(), t, t) or find_auto(info, MergeConfig())
        out = {"paper": MergeConfig(calibration="paper", window=args.ctx)}
        if cal is not None:
            out["aligned"] = MergeConfig(calibration=cal, window=args.ctx)
        return out

    print(f"model {model}, n_ctx {args.ctx}, last {args.scored} tokens scored (the last {args.decode} of them "
          f"decoding steps), window {args.ctx} (nothing merged)\n")
    print("| text | type | merge | max \\|Δ log p\\| vs stock type: prompt | decoding | KLD vs stock type | "
          "nothing merged vs f16: KLD | stock type vs f16: max \\|Δ log p\\| | KLD |")
    print("|---|---|---|---|---|---|---|---|---|")
    for domain in args.domains.split(","):
        vocab = Llama(model, n_ctx=64, vocab_only=True, verbose=False)
        toks = corpus.tokens_for(vocab, corpus.eval_text(domain), args.ctx, domain)[:args.ctx]
        tgt = np.array(toks[-args.scored:])
        sl = slice(len(toks) - args.scored - 1, len(toks) - 1)

        def lp(x):
            ls = log_softmax(x[sl])
            return ls[np.arange(len(tgt)), tgt]

        f16 = logits(model, toks, "f16", "f16", None, args.ctx, True, args.decode)
        for case in args.types.split(","):
            t, flash = case.split("-")[0], not case.endswith("flash-off")
            run = lambda cfg: logits(model, toks, t, t, cfg, args.ctx, flash, args.decode)  # noqa: E731
            stock = f16 if case == "f16" else run(None)
            own = np.abs(lp(stock) - lp(f16))
            for name, cfg in configs(t).items():
                got = run(cfg)
                d = np.abs(lp(got) - lp(stock))
                n_p = len(d) - args.decode
                print(f"| {domain} | {case} | {name} | {d[:n_p].max():.4f} | {d[n_p:].max():.4f} | "
                      f"{kld_per_token(stock[sl], got[sl]).mean():.2e} | {kld_per_token(f16[sl], got[sl]).mean():.2e} | {own.max():.4f} | "
                      f"{kld_per_token(f16[sl], stock[sl]).mean():.2e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
