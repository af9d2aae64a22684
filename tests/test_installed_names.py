"""The installed package must not shadow a user's own `models` / `callbacks` packages (issue 20, point 7).

The wheel is built from this checkout exactly as pip builds it, unpacked as pip installs it, and imported from a
user project that has packages of its own called `models` and `callbacks`.
"""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("alphaquant-*.whl")
    return path


def test_wheel_holds_only_the_alphaquant_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"alphaquant"}
    for needed in ("alphaquant/models/olmoe/modeling_olmoe.py", "alphaquant/models/common/decoder.py",
                   "alphaquant/callbacks/solve.py", "alphaquant/config/run.py", "alphaquant/arch/generic.py"):
        assert needed in names
    # every package of the checkout is in the wheel under its installed name
    for folder in ("models", "callbacks"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT).as_posix()
            assert f"alphaquant/{rel}" in names, rel


def test_a_users_own_models_and_callbacks_packages_still_import(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)          # what `pip install` puts into site-packages
    project = tmp_path / "project"
    for name in ("models", "callbacks"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"WHO = 'user {name}'\n")
    code = "\n".join([
        "import alphaquant, alphaquant.api",
        "from alphaquant.models.olmoe.modeling_olmoe import OlmoeForCausalLM",
        "import alphaquant.models, alphaquant.callbacks.solve, alphaquant.arch.generic",
        "import models, callbacks",
        "assert models.WHO == 'user models' and callbacks.WHO == 'user callbacks', (models, callbacks)",
        f"assert alphaquant.models.__file__.startswith({str(site)!r}), alphaquant.models.__file__",
        "assert alphaquant.models.from_config is not None and OlmoeForCausalLM.__module__.startswith('alphaquant.')",
        "print('ok')",
    ])
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=project, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_checkout_keeps_the_top_level_names_as_the_same_modules():
    code = "\n".join([
        "from models.olmoe.modeling_olmoe import OlmoeForCausalLM",
        "import alphaquant.models.olmoe.modeling_olmoe as real, models, callbacks.solve, alphaquant.callbacks.solve",
        "import sys",
        "assert OlmoeForCausalLM is real.OlmoeForCausalLM",
        "assert models is sys.modules['alphaquant.models'] and callbacks.solve is alphaquant.callbacks.solve",
        "print('ok')",
    ])
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
