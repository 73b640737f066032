"""The folder mapping (operator/ -> autoglm_operator, server/ -> autoglm_server,
dev/ -> autoglm_dev) works for the editable install and for a built wheel, and
does not shadow the standard library's ``operator``."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_editable_install_maps_folders_to_import_names() -> None:
    import operator as stdlib_operator

    import autoglm_dev
    import autoglm_operator
    import autoglm_server

    assert Path(autoglm_operator.__file__).parent == ROOT / "operator"
    assert Path(autoglm_server.__file__).parent == ROOT / "server"
    assert Path(autoglm_dev.__file__).parent == ROOT / "dev"
    # the standard library is untouched
    assert hasattr(stdlib_operator, "itemgetter")
    assert Path(stdlib_operator.__file__).parent != ROOT


@pytest.mark.slow
def test_wheel_contains_mapped_packages_and_imports(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(dist),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("autoglm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "autoglm_operator/__init__.py",
        "autoglm_server/__init__.py",
        "autoglm_dev/__init__.py",
    ):
        assert expected in names, f"{expected} missing from {wheel.name}"
    assert not any(n.startswith("operator/") for n in names), "the bare folder name must not ship"
    # every Python package in the mapped folders ships (pyproject lists them by name)
    for folder, name in (
        ("operator", "autoglm_operator"),
        ("server", "autoglm_server"),
        ("dev", "autoglm_dev"),
    ):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{name}/{rel}" in names, (
                f"{name}/{rel} missing: add the package to pyproject.toml"
            )

    # Install it alone into a fresh environment and import under the mapped names.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # cwd matters: from the repository root, `python -m` would put ./operator on
    # sys.path ahead of the standard library (see README, "Layout").
    subprocess.run(
        [py, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True, cwd=tmp_path
    )
    out = subprocess.run(
        [
            py,
            "-c",
            "import operator, autoglm_operator, autoglm_dev; print(operator.itemgetter, autoglm_operator.__file__)",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "site-packages/autoglm_operator/__init__.py" in out
