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


@pytest.fixture
def allow_calibration(monkeypatch):
    """This test calibrates on purpose."""
    monkeypatch.delenv(FORBID_ENV, raising=False)
