"""`minicache-gguf bench` on the real default model (tiny settings)."""

import json

from minicache_gguf import bench, cli
from minicache_gguf.llama import llama_cpp

PNG = b"\x89PNG\r\n\x1a\n"


def test_bench_small_run(tmp_path, capsys):
    rc = cli.main(["bench", "--ctx", "256,512", "--modes", "f16,q8_0,paper-w256", "--decode", "4", "--budget-mib", "8",
                   "--reps", "2", "--no-progress", "-o", str(tmp_path)])
    assert rc == 0
    assert "| 512 | paper-w256 |" in capsys.readouterr().out
    res = json.loads((tmp_path / "bench.json").read_text())
    m = res["modes"]
    assert list(m) == ["f16", "q8_0", "paper-w256"]
    for c in ("256", "512"):
        f16, q8 = m["f16"]["by_ctx"][c], m["q8_0"]["by_ctx"][c]
        assert f16["kv_bytes"] == 30 * 2 * 192 * 2 * int(c)  # 30 layers, K+V, 192 wide, f16
        assert abs(q8["kv_bytes"] / f16["kv_bytes"] - 34 / 64) < 0.01
        for d in m.values():
            x = d["by_ctx"][c]
            assert x["prefill_tok_s"] > 0 and x["decode_tok_s"] > 0
            # speed vs f16 is the median of per-rep paired ratios, inside their range; f16 vs itself is 1
            for k in ("prefill_tok_s", "decode_tok_s"):
                lo, hi = x["vs_f16_range"][k]
                assert lo <= x["vs_f16"][k] <= hi
        assert m["f16"]["by_ctx"][c]["vs_f16"] == {"kv_bytes": 1.0, "prefill_tok_s": 1.0, "decode_tok_s": 1.0}
    # 8 MiB: f16 holds 8 MiB / 23040 B = 364 tokens -> 256; q8_0 (12240 B/token) -> 512; the merged cache
    # (7 pairs, staging 256 + retention rows) takes ~7.0 MiB at 256 and ~13 MiB at 512 -> 256
    assert (m["f16"]["max_ctx_in_budget"], m["q8_0"]["max_ctx_in_budget"], m["paper-w256"]["max_ctx_in_budget"]) == (256, 512, 256)
    assert (tmp_path / "bench.png").read_bytes()[:8] == PNG


def test_largest_context_is_the_largest(model_path):
    kw = dict(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)
    budget = 20 << 20
    n = bench.largest_context(model_path, kw, budget)
    assert bench.kv_bytes(model_path, kw, n) <= budget < bench.kv_bytes(model_path, kw, n + 256)


def test_bench_refuses_quantized_v_without_flash_attention(capsys):
    """Before any work: q8_0 (K and V) needs flash attention; K-only quantization does not."""
    rc = cli.main(["bench", "--ctx", "256", "--modes", "f16,q8_0", "--flash-attn", "off", "--no-progress"])
    assert rc != 0
    assert "q8_0 quantize V, which needs flash attention" in capsys.readouterr().err
    bench.check_flash_attn(bench.modes({}, ["f16", "q8_0/f16"]), False)  # K only: accepted
