"""The console script, run as a user would."""

import json
import subprocess
import sys
from pathlib import Path

CLI = [str(Path(sys.executable).with_name("minicache-gguf"))]


def run(*args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300)


def test_help_has_examples():
    r = run("--help")
    assert r.returncode == 0 and "examples:" in r.stdout and "generate" in r.stdout
    r = run("generate", "--help")
    assert r.returncode == 0 and "example:" in r.stdout


def test_info_reports_the_build():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "llama-cpp-python==0.3.36" in r.stdout and "-DGGML_NATIVE=OFF" in r.stdout
    assert "0001-build-link-minicache-native-core.patch" in r.stdout


def test_generate_raw_json():
    r = run("generate", "--raw", "-p", "One, two, three,", "-n", "8", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stderr.strip().splitlines()[-1])
    assert summary["prompt_tokens"] > 0 and summary["generated_tokens"] >= 1
    assert r.stdout.strip()


def test_generate_with_kv_merge():
    r = run("generate", "--kv-merge", "--calibration", "paper", "--window", "16", "--raw", "-p", "The sea is", "-n", "64", "--json")
    assert r.returncode == 0, r.stderr
    kv = json.loads(r.stderr.strip().splitlines()[-1])["kv"]
    assert kv["kv_merge"] and kv["tokens_merged"] > 0 and kv["kv_bytes"] > 0
    r = run("generate", "--kv-merge", "--gamma", "2", "-p", "x")
    assert r.returncode == 1 and "gamma=2.0 is not valid" in r.stderr and "Traceback" not in r.stderr


def test_errors_are_one_line():
    r = run("generate", "-p", "x", "-n", "0")
    assert r.returncode == 2 and "-n 0 is not valid" in r.stderr
    r = run("generate", "-p", "x", "-m", "/nonexistent/model.gguf")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "error:" in r.stderr and "Traceback" not in r.stderr
    r = run("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_generate_about_a_document_merges_it(tmp_path):
    """The demo's main job in small: a document long enough to leave the window is merged and
    retained, and the summary line says so next to a stock cache of the same type."""
    import pydoc_data.topics

    from minicache_gguf import MergeConfig, calfile, default_model_path
    from minicache_gguf.model import ModelInfo

    shipped = calfile.find_auto(ModelInfo.of(default_model_path()), MergeConfig(calibration="auto"))
    doc = tmp_path / "doc.txt"
    doc.write_text(pydoc_data.topics.topics["assignment"][:6000])
    r = run("generate", "--kv-merge", "--calibration", str(shipped), "--window", "64", "--n-ctx", "4096", "--doc", str(doc),
            "-p", "In one sentence, what is this text about?", "-n", "16")
    assert r.returncode == 0, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "for a stock cache of the same type" in line and "aligned" in line
    merged = int(line.split(" merged (")[0].rsplit(" ", 1)[1])
    assert merged > 500, line
    r = run("generate", "-p", "x", "--doc", str(tmp_path / "missing.txt"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_cache_types_like_llama_cpp():
    """-ctk/-ctv take llama.cpp's type names or ggml numbers; a quantized V turns flash attention on."""
    r = run("generate", "--kv-merge", "--calibration", "paper", "--window", "16", "-ctk", "q8_0", "-ctv", "2", "--raw", "-p", "The sea is",
            "-n", "64", "--json")
    assert r.returncode == 0, r.stderr
    kv = json.loads(r.stderr.strip().splitlines()[-1])["kv"]
    assert kv["kv_merge"] and kv["tokens_merged"] > 0
    r = run("generate", "-ctk", "q3_k", "-p", "x")
    assert r.returncode == 2 and "'q3_k' is not valid: expected one of f32 (0), f16 (1)" in r.stderr


def test_reports_without_matplotlib_name_the_extra(tmp_path, monkeypatch, capsys):
    """matplotlib is the "plots" extra: without it a report keeps its markdown and JSON and says
    in one line how to get the PNG."""
    from minicache_gguf import report

    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    drawn = []
    out = report.write(tmp_path, "x", "# x\n", {"a": 1}, lambda p: drawn.append(p) or p)
    assert [p.name for p in out] == ["x.md", "x.json"] and not drawn
    assert 'pip install "minicache-gguf[plots]"' in capsys.readouterr().err
