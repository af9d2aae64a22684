"""Packaging beyond pyproject.toml: models/ and callbacks/ install as alphaquant.models / alphaquant.callbacks.

A top-level `models` or `callbacks` in site-packages would shadow a user's own package of that name, so the wheel
holds only `alphaquant`; from a checkout the top-level names keep working (alphaquant/_layout.py).
"""
from setuptools import find_packages, setup

MOVED = ("models", "callbacks")
packages = find_packages(include=["alphaquant", "alphaquant.*"])
packages += [f"alphaquant.{name}" for name in find_packages(include=[f"{m}{s}" for m in MOVED for s in ("", ".*")])]
setup(packages=packages, package_dir={f"alphaquant.{m}": m for m in MOVED})
