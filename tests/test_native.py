"""The native core (C, called inside the patched libllama) against the NumPy reference, and the
reference's own contract.

The core holds what the engine runs on the host: restore (norm * dir, * R^T), retain_count and the
f16 conversions; those are compared with minicache_gguf/reference.py here. The merge (SLERP, norms,
distances, retention selection) exists only as the reference and the engine's ggml graphs: its
properties are tested on the reference here, and the graphs against it in tests/test_engine.py.

Tolerances: both sides compute in float64 and round once, so float32 outputs agree to ~1 ulp
(asserted: 2e-6 relative to the norm on restored rows); float16 outputs agree to 1 f16 ulp
(asserted: 1e-3 relative to the norm).
"""

from __future__ import annotations

from pathlib import Path

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minicache_gguf import native, reference

ROOT = Path(__file__).resolve().parent.parent
# restore and retain_count exist in both; the merge functions only in the reference
IMPLS = [pytest.param(reference, id="numpy"), pytest.param(native, id="native")]
# what the engine calls from the core (llama_minicache_get_rows, retention) and the binding needs
CORE_FUNCS = {"minicache_version", "minicache_status_str", "minicache_fp32_to_fp16", "minicache_fp16_to_fp32",
              "minicache_fp32_to_fp16_row", "minicache_fp16_to_fp32_row", "minicache_restore",
              "minicache_retain_count"}
DTYPES = [np.float32, np.float16]

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def adversarial_pairs(draw_kind: str, x0: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Make x1 from x0 according to an edge case."""
    if draw_kind == "random":
        return rng.standard_normal(x0.shape).astype(x0.dtype)
    if draw_kind == "identical":
        return x0.copy()
    if draw_kind == "scaled":
        with np.errstate(over="ignore"):
            return (x0.astype(np.float32) * 3.5).astype(x0.dtype)
    if draw_kind == "opposite":
        return (-x0.astype(np.float32) * 0.25).astype(x0.dtype)
    if draw_kind == "zero":
        return np.zeros_like(x0)
    if draw_kind == "near":
        return (x0.astype(np.float32) + np.float32(1e-4) * rng.standard_normal(x0.shape).astype(np.float32)).astype(x0.dtype)
    raise AssertionError(draw_kind)


@st.composite
def row_pairs(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n_rows = draw(st.integers(0, 12))
    n_embd = draw(st.integers(1, 48))
    lim = 6e4 if dtype == np.float16 else 1e6
    x0 = draw(hnp.arrays(dtype, (n_rows, n_embd),
                         elements=st.floats(-lim, lim, width=16 if dtype == np.float16 else 32,
                                            allow_nan=False, allow_infinity=False)))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3] if dtype == np.float16 else [1.0, 1e-20, 1e-3, 1e3, 1e20]))
    x0 = (x0.astype(np.float64) * scale).astype(dtype) if dtype == np.float32 else (x0.astype(np.float64) * scale).clip(-6e4, 6e4).astype(dtype)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kinds = draw(st.lists(st.sampled_from(["random", "identical", "scaled", "opposite", "zero", "near"]),
                          min_size=n_rows, max_size=n_rows))
    x1 = np.empty_like(x0)
    for i, k in enumerate(kinds):
        x1[i] = adversarial_pairs(k, x0[i:i + 1], rng)[0]
    if draw(st.booleans()):
        x0, x1 = x1, x0
    return x0, x1, seed


def test_cdef_mirrors_header():
    declared = native.header_prototypes(ROOT / "native" / "minicache.h")
    assert declared == CORE_FUNCS  # the core holds what the engine runs, nothing more
    bound = {name for name in declared if f"{name}(" in native.CDEF}
    assert bound == declared, f"not mirrored in native.CDEF: {declared - bound}"
    assert _structs(native.CDEF) == {k: v for k, v in _structs((ROOT / "native" / "minicache.h").read_text()).items()
                                     if k in _structs(native.CDEF)}


def _structs(text: str) -> dict:
    """struct name -> [(type, field), ...] in order, from C declarations (comments dropped)."""
    text = re.sub(r"//[^\n]*|/\*.*?\*/", "", text, flags=re.S)
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{([^}]*)\}", text):
        fields = []
        for decl in body.split(";"):
            decl = " ".join(decl.split())
            if decl:
                typ, _, field = decl.rpartition(" ")
                fields.append((typ.replace(" *", "*") + "*" * field.count("*"), field.lstrip("*")))
        out[name] = fields
    return out


def test_engine_cdef_mirrors_the_engine_header():
    """The cffi mirror of include/llama-minicache.h: every function, every struct field (name, type,
    order) and every enum value as in the header."""
    from minicache_gguf import engine

    header = (ROOT / "patches" / "llama.cpp" / "include" / "llama-minicache.h").read_text()
    funcs = set(re.findall(r"LLAMA_API\s+[\w\s\*]+?\b(llama_minicache_\w+)\s*\(", header))
    assert len(funcs) >= 7
    assert {f for f in funcs if f"{f}(" in engine.CDEF} == funcs
    want, got = _structs(header), _structs(engine.CDEF)
    assert len(want) == 3  # pair, params, stats: a parse that finds nothing fails
    assert set(got) == set(want) and got == want, (got, want)
    enum = lambda t: dict(re.findall(r"(LLAMA_MINICACHE_\w+)\s*=\s*(\d+)", re.sub(r"//[^\n]*", "", t)))
    assert enum(engine.CDEF) == enum(header)


def test_core_comes_from_patched_libllama():
    from minicache_gguf import _engine

    assert native.version() == "0.2.0"
    assert _engine.manifest("patched")["variant"] == "patched"


def test_engine_calls_the_core_it_links():
    """The engine sources call the core's restore and retain_count; no engine source calls a merge
    function of the core (the merge runs as the engine's ggml graphs, not in C on the host)."""
    src = "\n".join(p.read_text() for p in sorted((ROOT / "patches" / "llama.cpp" / "src").glob("*.cpp")))
    called = set(re.findall(r"(?<![\w:.>])(minicache_\w+)\s*\(", src))  # free functions, not methods
    assert called >= {"minicache_restore", "minicache_retain_count"}
    assert called <= CORE_FUNCS, called - CORE_FUNCS


# --- float16 storage --------------------------------------------------------------------------

def test_fp16_to_fp32_exhaustive():
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    got, want = native.fp16_to_fp32(h), h.astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_fp32_to_fp16_matches_numpy_rounding():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, size=400_000, dtype=np.uint64).astype(np.uint32)
    # and every float32 near the f16 range edges, subnormals and rounding ties
    edges = np.array([65504, 65519.99, 65520, 65536, 6.1035156e-05, 5.9604645e-08, 2.9802322e-08,
                      2.9802326e-08, 1.0, 1.0004883, 1.0009766, -0.0, np.inf, -np.inf, np.nan], dtype=np.float32)
    x = np.concatenate([bits.view(np.float32), edges, np.nextafter(edges, np.float32(np.inf)),
                        np.nextafter(edges, np.float32(-np.inf))]).astype(np.float32)
    got, want = native.fp32_to_fp16(x), reference.fp32_to_fp16(x)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


# --- C versus NumPy ---------------------------------------------------------------------------

def strided(x: np.ndarray, transposed: bool) -> np.ndarray:
    """x itself, or the same values stored transposed (as llama.cpp's v_trans): a strided view."""
    return np.ascontiguousarray(x.T).T if transposed else x


@SETTINGS
@given(row_pairs(), st.sampled_from(DTYPES), st.sampled_from(DTYPES), st.booleans(), st.booleans())
def test_restore_native_equals_reference(pair, dir_dtype, out_dtype, with_rot, transposed):
    """Directions of f16 or f32, read through contiguous or transposed views, restored with and
    without the rotation: the C core gives the reference's rows."""
    x0, x1, seed = pair
    rot = random_orthogonal(x0.shape[1], np.random.default_rng(seed)) if with_rot else None
    m = reference.merge(x0, x1, 0.6, rot, dir_dtype)
    e = strided(m.dir, transposed)
    if transposed and min(x0.shape) > 1:
        assert not e.flags.c_contiguous  # the C side reads it through its strides
    for norm, r in ((m.norm0, rot), (m.norm1, None)):
        got = native.restore(e, norm, r, out_dtype).astype(np.float64)
        want = reference.restore(m.dir, norm, r, out_dtype).astype(np.float64)
        tol = (1e-3 if out_dtype == np.float16 else 2e-6) * np.maximum(norm[:, None].astype(np.float64), 1e-30)
        assume(np.all(np.isfinite(want)))  # overflow to f16 inf: test_restore_overflow_to_f16_inf
        assert np.all(np.abs(got - want) <= tol + 1e-30)


def test_restore_overflow_to_f16_inf():
    """A restored value beyond f16's range rounds to +-Inf in both (as ggml's conversion)."""
    e = np.array([[0.6, -0.8], [1.0, 0.0]], np.float32)
    norm = np.array([1e6, 65504], np.float32)
    for impl in (reference, native):
        got = impl.restore(e, norm, out_dtype=np.float16)
        assert np.isposinf(got[0, 0]) and np.isneginf(got[0, 1])
        assert got[1].tolist() == [65504.0, 0.0]


@SETTINGS
@given(st.integers(0, 10_000_000), st.floats(0, 1, width=32))
def test_retain_count_native_equals_reference(n, gamma):
    assert native.retain_count(n, gamma) == reference.retain_count(n, gamma)


def test_nonfinite_rows_restore_native_equals_reference():
    """Rows holding NaN/Inf: the reference's merge gives direction 0, distance 1 and a NaN/Inf norm;
    restoring them (C and NumPy alike) gives a row of NaN/Inf, never a silently finite one."""
    x0 = np.array([[1, 2, np.nan], [np.inf, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=np.float32)
    x1 = np.array([[1, 2, 3], [1, 0, 1], [-np.inf, 1, 1], [np.nan, 0, 0]], dtype=np.float32)
    m = reference.merge(x0, x1, 0.5)
    assert np.all(m.dist == 1.0) and np.all(m.dir == 0.0)
    rot = random_orthogonal(3, np.random.default_rng(5))
    for norm, r in ((m.norm0, None), (m.norm0, rot), (m.norm1, None)):
        for out_dtype in DTYPES:
            got, want = native.restore(m.dir, norm, r, out_dtype), reference.restore(m.dir, norm, r, out_dtype)
            np.testing.assert_array_equal(got, want)  # NaN where NaN, the same Inf elsewhere
            assert not np.any(np.isfinite(got[~np.isfinite(norm)]))


def test_transposed_view_equals_contiguous():
    """A V cache stored transposed ([n_embd, kv_size]) is restored in place through strides, read
    and written: the same rows as from and to contiguous arrays."""
    rng = np.random.default_rng(1)
    vt0 = rng.standard_normal((64, 40)).astype(np.float16)  # [n_embd, n_tokens] as llama.cpp's v_trans
    vt1 = rng.standard_normal((64, 40)).astype(np.float16)
    rot = random_orthogonal(64, rng)
    m = reference.merge(vt0.T, vt1.T, 0.6, rot=rot, out_dtype=np.float16)
    dir_t = np.ascontiguousarray(m.dir.T)  # the directions stored transposed too
    for r in (None, rot):
        want = native.restore(m.dir, m.norm0, r, np.float16)
        assert np.array_equal(native.restore(dir_t.T, m.norm0, r, np.float16), want)
        out_t = np.zeros((64, 40), np.float16)  # written through a transposed view
        rr = native._rot(r, 64)
        assert native.load().minicache_restore(native._view(dir_t.T), native._fptr(m.norm0), 40, 64,
                                               native._fptr(rr), native._view(out_t.T)) == 0
        assert np.array_equal(out_t.T, want)
        ref = reference.restore(m.dir, m.norm0, r, np.float16).astype(np.float64)
        assert np.all(np.abs(want.astype(np.float64) - ref) <= 1e-3 * m.norm0[:, None])


# --- properties of the reference's merge and retention; restore in both ----------------------

def angle(a, b):
    a = a / np.linalg.norm(a)
    b = b / np.linalg.norm(b)
    return 2 * np.arctan2(np.linalg.norm(a - b), np.linalg.norm(a + b))


def test_slerp_endpoints_and_midpoint():
    rng = np.random.default_rng(2)
    u0, u1 = rng.standard_normal(64).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    e0, _ = reference.slerp(u0, u1, 0.0)
    e1, _ = reference.slerp(u0, u1, 1.0)
    np.testing.assert_allclose(e0, u0 / np.linalg.norm(u0), atol=1e-6)
    np.testing.assert_allclose(e1, u1 / np.linalg.norm(u1), atol=1e-6)
    for t in (0.25, 0.5, 0.6):
        e, d = reference.slerp(u0, u1, t)
        w = angle(u0.astype(np.float64), u1.astype(np.float64))
        assert abs(np.linalg.norm(e) - 1) < 1e-6
        assert d == pytest.approx(w / np.pi, abs=1e-6)
        assert angle(u0, e) == pytest.approx(t * w, abs=1e-5)
        assert angle(e, u1) == pytest.approx((1 - t) * w, abs=1e-5)


def test_slerp_degenerate_cases():
    """The degenerate-input contract of minicache_gguf/reference.py (module docstring)."""
    u = np.array([3.0, -4.0, 0.0, 12.0], dtype=np.float32)
    e, d = reference.slerp(u, u * 2, 0.6)  # identical direction: lerp fallback
    np.testing.assert_allclose(e, u / 13, atol=1e-7)
    assert d == 0.0
    for t in (0.0, 0.5, 0.8):
        e, d = reference.slerp(u, -u * 3, t)  # opposite: no direction serves both, e = 0, distance 1
        assert d == 1.0 and np.all(e == 0)
    e, d = reference.slerp(u, np.zeros(4, np.float32), 0.5)  # a zero row: the other direction, lossless
    np.testing.assert_allclose(e, u / 13, atol=1e-7)
    assert d == 0.0
    e, d = reference.slerp(np.zeros(4, np.float32), np.zeros(4, np.float32), 0.5)
    assert np.all(e == 0) and d == 0.0
    e, d = reference.slerp(np.array([2.0], np.float32), np.array([-1.0], np.float32), 0.5)  # 1-D, antipodal
    assert d == 1.0 and np.all(e == 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_identical_rows_restore_exactly(impl, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((32, 96)).astype(dtype)
    m = reference.merge(x, x, 0.6, out_dtype=dtype)
    tol = 1e-3 if dtype == np.float16 else 1e-6
    np.testing.assert_allclose(impl.restore(m.dir, m.norm0, out_dtype=np.float32), x.astype(np.float32), atol=tol * 4)
    assert np.all(m.dist < 1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_rotation_aligns_and_restores(impl):
    """x1 = c * x0 @ R: with R the merge is lossless for both layers; without it, it is not."""
    rng = np.random.default_rng(4)
    r = random_orthogonal(64, rng)
    x0 = rng.standard_normal((50, 64)).astype(np.float32)
    x1 = (x0 @ r * 1.7).astype(np.float32)
    m = reference.merge(x0, x1, 0.6, rot=r)
    assert np.all(m.dist < 1e-3)
    np.testing.assert_allclose(impl.restore(m.dir, m.norm0, rot=r), x0, atol=1e-4)
    np.testing.assert_allclose(impl.restore(m.dir, m.norm1), x1, atol=1e-4)
    plain = reference.merge(x0, x1, 0.6)
    assert np.median(plain.dist) > 0.3
    assert np.abs(impl.restore(plain.dir, plain.norm0) - x0).max() > 0.5


def test_retention_topk_and_threshold():
    d = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.7, 0.3, 0.4, 0.6, 0.8], dtype=np.float32)
    keep = reference.retain_select(d, 0.2, "topk")  # ceil(0.2 * 10) = 2: the two 0.9s
    assert keep.tolist() == [False, True, False, True, False, False, False, False, False, False]
    keep = reference.retain_select(d, 0.1, "topk")  # one slot, tie on 0.9: lower index wins
    assert np.flatnonzero(keep).tolist() == [1]
    # threshold: d > 0.1 + 0.8 * (1 - 0.3) = 0.66
    assert np.flatnonzero(reference.retain_select(d, 0.3, "threshold")).tolist() == [1, 3, 5, 9]
    assert not reference.retain_select(d, 0.0, "topk").any()
    assert not reference.retain_select(d, 0.0, "threshold").any()
    assert reference.retain_select(d, 1.0, "topk").all()
    assert reference.retain_select(d, 1.0, "threshold").sum() == 9  # all but the minimum
    assert not reference.retain_select(np.full(5, 0.3, np.float32), 0.5, "threshold").any()
    assert reference.retain_select(np.zeros(0, np.float32), 0.5).size == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_retain_count(impl):
    assert impl.retain_count(100, 0.05) == 5  # not 6 from 0.05f's rounding excess
    assert impl.retain_count(100, 0.051) == 6
    assert impl.retain_count(7, 0.05) == 1
    assert impl.retain_count(0, 0.5) == 0
    assert impl.retain_count(10, 1.0) == 10
    assert impl.retain_count(10, 0.2) == 2
    assert impl.retain_count(1_000_000, 0.3) == 300_000
    assert impl.retain_count(1_000_000, 0.3000005) == 300_001


# --- bad input ---------------------------------------------------------------------------------

def test_invalid_merge_arguments_raise():
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match="t=1.5"):
        reference.merge(x, x, 1.5)
    with pytest.raises(ValueError, match="t=nan"):
        reference.merge(x, x, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        reference.merge(x, np.ones((3, 5), np.float32), 0.5)
    with pytest.raises(TypeError, match="float64"):
        reference.merge(x.astype(np.float64), x, 0.5)
    with pytest.raises(ValueError, match=r"rot must be a \[4, 4\]"):
        reference.merge(x, x, 0.5, rot=np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="gamma=1.5"):
        reference.retain_select(np.zeros(3, np.float32), 1.5)
    with pytest.raises(ValueError, match="'best'"):
        reference.retain_select(np.zeros(3, np.float32), 0.5, "best")
    with pytest.raises(ValueError, match="NaN"):
        reference.retain_select(np.array([0.1, np.nan], np.float32), 0.5)
    bad_rot = np.eye(4, dtype=np.float32)
    bad_rot[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reference.merge(x, x, 0.5, rot=bad_rot)


@pytest.mark.parametrize("impl", IMPLS)
def test_invalid_restore_arguments_raise(impl):
    e = np.ones((3, 4), np.float32)
    n = np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        impl.restore(e, np.ones(2, np.float32))
    with pytest.raises(TypeError, match="float64"):
        impl.restore(e.astype(np.float64), n)
    with pytest.raises(TypeError, match="float64"):
        impl.restore(e, n, out_dtype=np.float64)
    with pytest.raises(ValueError, match=r"rot must be a \[4, 4\]"):
        impl.restore(e, n, rot=np.eye(3, dtype=np.float32))
    bad_rot = np.eye(4, dtype=np.float32)
    bad_rot[0, 0] = np.nan
    with pytest.raises((ValueError, native.MinicacheError), match="NaN"):
        impl.restore(e, n, rot=bad_rot)


def test_c_status_codes():
    """The C entry points refuse bad arguments themselves (the engine calls them directly), and
    write nothing when they do."""
    lib, ffi = native.load(), native._ffi
    x = np.ones((2, 4), np.float32)
    v = native._view(x)
    norm = np.array([2.0, 3.0], np.float32)
    s = native._fptr(norm)
    out = np.full((2, 4), 7.0, np.float32)
    o = native._view(out)
    bad = native._view(x)
    bad.type = 7
    bad_rot = np.eye(4, dtype=np.float32)
    bad_rot[2, 1] = np.inf
    for status, args in (
        (lib.MINICACHE_ERR_NULL, (ffi.NULL, s, 2, 4, ffi.NULL, o)),
        (lib.MINICACHE_ERR_NULL, (v, ffi.NULL, 2, 4, ffi.NULL, o)),
        (lib.MINICACHE_ERR_NULL, (v, s, 2, 4, ffi.NULL, ffi.NULL)),
        (lib.MINICACHE_ERR_NULL, (native._view(x), s, 2, 4, ffi.NULL, _null_data(native._view(out)))),
        (lib.MINICACHE_ERR_SIZE, (v, s, -1, 4, ffi.NULL, o)),
        (lib.MINICACHE_ERR_SIZE, (v, s, 2, 0, ffi.NULL, o)),
        (lib.MINICACHE_ERR_TYPE, (bad, s, 2, 4, ffi.NULL, o)),
        (lib.MINICACHE_ERR_TYPE, (v, s, 2, 4, ffi.NULL, bad)),
        (lib.MINICACHE_ERR_NONFINITE, (v, s, 2, 4, native._fptr(bad_rot), o)),
    ):
        assert lib.minicache_restore(*args) == status, (status, args)
        assert np.all(out == 7.0)  # nothing written
    assert lib.minicache_restore(v, s, 2, 4, ffi.NULL, o) == lib.MINICACHE_OK
    assert out.tolist() == [[2.0] * 4, [3.0] * 4]
    assert lib.minicache_restore(v, s, 0, 4, ffi.NULL, o) == lib.MINICACHE_OK  # no rows: nothing to do
    with pytest.raises(native.MinicacheError, match="status -5: NaN or Inf"):
        native.restore(x, norm, rot=bad_rot)
    for st_ in range(-6, 1):
        assert ffi.string(lib.minicache_status_str(st_)) != b"unknown status"
    assert ffi.string(lib.minicache_status_str(-7)) == b"unknown status"


def _null_data(v):
    v.data = native._ffi.NULL
    return v


def test_streaming_retention_of_one_step_is_the_top_k():
    """One merge step: the streaming rule keeps what retain_select keeps (the single-step oracle
    and the calibration's one-step simulation rely on it); several steps keep another set."""
    rng = np.random.default_rng(7)
    d = rng.random(1000).astype(np.float32)
    for mode in ("topk", "threshold"):
        assert np.array_equal(reference.stream_retained(d, [1000], 0.05, mode=mode), reference.retain_select(d, 0.05, mode))
    # window 256, block 32: a staging pool of 288; the second ubatch merges what the pool cannot hold
    # (224), each later one as many as it brings; the next token finds 288 staged: the 32 beyond the window
    assert reference.merge_steps(1000, 256, 256, 32) == [224, 256, 232, 32]
    # window 32, block 32, ubatches of 48: a pool of 64; the second ubatch merges 32, each later one
    # 48, the last (40) 40; the next token finds 64 staged: the 32 beyond the window
    assert reference.merge_steps(1000, 32, 48, 32) == [32] + [48] * 18 + [40, 32]
    # block 0: every step merges what leaves the window (a decoding token merges one)
    assert reference.merge_steps(1000, 32, 48, 0) == [48] * 19 + [40, 16]
    many = reference.stream_retained(d[:968], reference.merge_steps(1000, 32, 48, 32), 0.05)
    assert many.sum() == reference.retain_count(968, 0.05)
    assert not np.array_equal(many, reference.retain_select(d[:968], 0.05))
