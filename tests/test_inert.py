"""With merging off, the patch series is inert: the patched engine (through minicache_gguf.Llama)
gives bit-identical greedy tokens and logits to stock llama-cpp-python 0.3.36 built from the same
sdist with the same flags (the stock build is made by `scripts/setup.sh --stock`, which
scripts/test.sh runs)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minicache_gguf import _engine

sys.path.insert(0, str(Path(__file__).parent))
from engine_probe import N_GEN, run_probe  # noqa: E402


@pytest.mark.parametrize("flash_attn", [False, True], ids=["flash_off", "flash_on"])
def test_patched_engine_equals_stock(tmp_path, model_path, flash_attn):
    from minicache_gguf import Llama

    stock_lib = _engine.lib_dir("stock")
    assert stock_lib != _engine.lib_dir("patched")
    out = tmp_path / "stock.npz"
    subprocess.run([sys.executable, str(Path(__file__).parent / "engine_probe.py"), str(stock_lib),
                    str(model_path), str(out), "1" if flash_attn else "0"], check=True)
    stock = np.load(out)
    assert Path(str(stock["lib"])).resolve() == stock_lib.resolve()

    prompt, tokens, logits = run_probe(Llama, model_path, flash_attn)
    assert np.array_equal(prompt, stock["prompt"])
    assert len(tokens) == N_GEN
    assert tokens.tolist() == stock["tokens"].tolist()
    assert logits.shape == stock["logits"].shape and logits.shape[0] >= len(prompt) + N_GEN - 1
    assert np.isfinite(logits).all()
    assert np.array_equal(logits, stock["logits"]), \
        f"max |diff| = {np.abs(logits - stock['logits']).max()}"
