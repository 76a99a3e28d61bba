"""One real local Ray instance for the whole test session (starting Ray costs seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


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
