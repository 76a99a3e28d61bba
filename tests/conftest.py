"""One real local Ray instance for the whole test session (starting Ray costs seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


# the fixtures that start Ray: the session's local Ray (below), a `ray start --head` of its own
# (test_cluster.py) and the emulated cluster (test_emulated.py)
RAY_FIXTURES = {"ray_cluster", "head", "cluster"}


def pytest_collection_modifyitems(items):
    """The fast tier (`make test-fast`, `-m "not ray"`) is every test that needs no Ray cluster: a
    test that uses a fixture that starts Ray gets the `ray` marker here; one that starts Ray another
    way (a CLI in a subprocess) carries `@pytest.mark.ray` itself."""
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=True, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def smoke_config(tmp_path):
    """The smoke preset, writing into this test's temporary folder."""
    from ray_codistill.config import load_config
    return load_config(CONFIGS / "smoke.yaml", storage_path=str(tmp_path))
