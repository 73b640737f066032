"""Folder-to-package mapping; everything else is in pyproject.toml.

The folders keep the names the design gives them (operator/, server/, dev/),
but `operator` is a standard-library module, so they install under these
import names. Sub-packages are found, not listed, so a new one can't be left
out of the wheel (tests/unit/test_packaging.py checks it).
"""

from setuptools import find_packages, setup

PACKAGE_DIRS = {
    "autoglm_operator": "operator",
    "autoglm_server": "server",
    "autoglm_dev": "dev",
}

packages = []
for name, folder in PACKAGE_DIRS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=PACKAGE_DIRS)
