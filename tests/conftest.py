import pytest


@pytest.fixture(scope="session")
def model_path():
    from minicache_gguf import default_model_path

    return default_model_path()
