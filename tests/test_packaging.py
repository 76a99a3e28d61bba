"""One Ray version for the package and the container image."""

from __future__ import annotations

import re
import tomllib

import ray

from conftest import ROOT


def _pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray_dep, = [d for d in deps if re.match(r"ray\[", d)]
    return re.search(r"==([\d.]+)", ray_dep).group(1)


def test_dockerfile_and_package_pin_the_same_ray():
    docker = re.search(r"^ARG RAY_VERSION=([\d.]+)$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert docker and docker.group(1) == _pinned_ray()
    manifest = re.search(r'rayVersion: "([\d.]+)"', (ROOT / "docker" / "rayjob.yaml").read_text())
    assert manifest and manifest.group(1) == _pinned_ray()


def test_installed_ray_is_the_pinned_one():
    assert ray.__version__ == _pinned_ray()
