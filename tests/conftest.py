import os

import pytest

from minicache_gguf.calibrate import FORBID_ENV


@pytest.fixture(scope="session")
def model_path():
    from minicache_gguf import default_model_path

    return default_model_path()


@pytest.fixture(scope="session", autouse=True)
def no_unasked_calibration():
    """No test starts a calibration without asking: one the package has not shipped would cost
    minutes on a fresh machine (and a cache left on a developer's machine would hide it). The
    variable reaches the tests' subprocesses too; a test that calibrates asks with allow_calibration."""
    os.environ[FORBID_ENV] = "1"
    yield
    os.environ.pop(FORBID_ENV, None)


@pytest.fixture(scope="session")
def on_gpu():
    """The caches these tests create live on a GPU: the CUDA engine with every layer offloaded
    (scripts/gpu_check.sh sets both variables)."""
    from minicache_gguf import _engine
    from minicache_gguf.config import default_n_gpu_layers

    return os.environ.get(_engine.CUDA_ENV, "") not in ("", "0") and default_n_gpu_layers() == -1


@pytest.fixture
def allow_calibration(monkeypatch):
    """This test calibrates on purpose."""
    monkeypatch.delenv(FORBID_ENV, raising=False)


#: tests of more than ~3 s each on a 2-core CPU (or behind a fixture that costs minutes): marked
#: "slow"; `pytest -m "not slow"` is the fast tier of the inner loop (docs/development.md)
SLOW = (
    "tests/test_chat.py",  # its module fixture calibrates
    "tests/test_inert.py",
    "tests/test_iswa.py",  # its module fixture fetches Gemma 3 270M (250 MB) on a fresh machine
    "tests/test_multiseq.py",
    "tests/test_llama_server.py::test_two_concurrent_clients_get_what_one_at_a_time_gets",
    "tests/test_llama_server.py::test_default_server_merges_and_stock_server_reports_nothing_merged",
    "tests/test_llama_server.py::test_a_calibration_for_another_model_is_refused_before_it_listens",
    "tests/test_install.py",
    "tests/test_bench.py::test_bench_small_run",
    "tests/test_calibration.py::test_auto_calibration_is_rescored_and_cached_per_model",
    "tests/test_calibration.py::test_calibration_is_deterministic",
    "tests/test_calibration.py::test_calibration_on_a_users_text",
    "tests/test_calibration.py::test_aligned_engine_equals_the_reference",
    "tests/test_engine.py::test_state_round_trip_and_refusals",
    "tests/test_engine.py::test_equivalence_oracle",
    "tests/test_engine.py::test_flash_attention_on_and_off_agree",
    "tests/test_engine.py::test_long_generation_crosses_the_window",
    "tests/test_engine.py::test_merge_step_runs_on_the_cache_backend",
    "tests/test_engine.py::test_high_level_api",
    "tests/test_layouts.py::test_layout_merge_oracle",
    "tests/test_policy.py::test_a_model_without_calibration_is_refused_with_its_cost",
    "tests/test_policy.py::test_cache_simulation_holds_what_the_engine_holds",
    "tests/test_quality.py::test_eval_small_run",
    "tests/test_quality.py::test_eval_several_texts",
    "tests/test_quality.py::test_analyze_writes_table_json_and_plot",
    "tests/test_quantized.py::test_errors_do_not_amplify_on_q8_0",
    "tests/test_quantized.py::test_every_cache_type_merges",
    "tests/test_quantized.py::test_quantized_merge_oracle",
    "tests/test_quantized.py::test_quantized_state_round_trip_and_type_refusal",
    "tests/test_reliability.py::test_soak_mixed_operations_replay_identically",
    "tests/test_reliability.py::test_state_fuzz_never_kills_the_process",
    "tests/test_reliability.py::test_same_prompt_same_output_however_the_cache_was_reached",
    "tests/test_reliability.py::test_refused_state_leaves_no_nonfinite_values",
    "tests/test_reliability.py::test_released_cells_leave_no_nonfinite_values",
    "tests/test_rpc.py::test_merged_cache_on_an_rpc_server",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = item.nodeid.split("[")[0]
        if any(node == s or node.startswith(s + "::") for s in SLOW):
            item.add_marker(pytest.mark.slow)
