"""What each merged pool of a calibration costs on a text, alone and together, by the simulation
`minicache-gguf calibrate` scores with (llama.cpp's real KV state, merged in NumPy; the engine
reproduces it exactly): KLD of the next `--scored` tokens and of a retrieval probe (a span from a
quarter into the context repeated after it), at context --n-ctx.

    .venv/bin/python scripts/pool_costs.py --text builtin:legal --n-ctx 4096
"""

from __future__ import annotations

import argparse

from minicache_gguf import MergeConfig, _internals, calfile, corpus
from minicache_gguf.alignment import simulate_merge
from minicache_gguf.calibrate import PROBE_DEPTH
from minicache_gguf.config import DEFAULT_SCORED
from minicache_gguf.metrics import KldScorer
from minicache_gguf.model import ModelInfo, default_model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", default=None, help="calibration file (default: the shipped one)")
    ap.add_argument("--text", default="builtin:legal", help="UTF-8 file or builtin:DOMAIN (default builtin:legal)")
    ap.add_argument("--n-ctx", type=int, default=MergeConfig.calibration_ctx)
    ap.add_argument("--scored", type=int, default=DEFAULT_SCORED)
    args = ap.parse_args()
    model = default_model_path()
    info = ModelInfo.of(model)
    path = args.calibration or calfile.find_auto(info, MergeConfig(calibration="auto"))
    cal = calfile.load_calibration(path, info)
    text, what = corpus.text_arg(args.text)
    s = cal.settings
    llm = _internals.plain_llama(model, n_ctx=args.n_ctx, n_batch=512, flash_attn=True, verbose=False)
    toks = corpus.tokens_for(llm, text, args.n_ctx, "text")[:args.n_ctx]
    context = args.n_ctx - args.scored
    p0 = int(PROBE_DEPTH * context)
    sc = KldScorer(llm, toks[:context], toks[context:], {"copy": toks[p0:p0 + args.scored]})
    print(f"{what}; n_ctx {args.n_ctx}, {args.scored} tokens scored; calibration {path}")
    print("| pool | next KLD | copy-probe KLD |\n|---|---|---|")
    for name, pools in [("all", cal.pairs)] + [(f"{q.kind.upper()} {q.layer}-{q.layer + 1}", [q]) for q in cal.pairs]:
        k = sc.klds(simulate_merge(sc.state, pools, s["t"], s["gamma"], s["window"]))
        print(f"| {name} | {k['next']:.4f} | {k['copy']:.4f} |")
    llm.close()


if __name__ == "__main__":
    main()
