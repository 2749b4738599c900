"""The wheel holds one package, `prefect_gpt_image`, built from the top-level folders."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("src", "blocks", "tasks", "flows"):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    build = "from setuptools import build_meta as b; print(b.build_wheel(r'{}'))"
    subprocess.run(
        [sys.executable, "-c", build.format(tmp_path / "dist")],
        cwd=source,
        check=True,
        capture_output=True,
    )

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.startswith("prefect_gpt_image-")}
    assert top_level == {"prefect_gpt_image"}
    for module in (
        "prefect_gpt_image/blocks/credentials.py",
        "prefect_gpt_image/tasks/generate.py",
        "prefect_gpt_image/tasks/upload.py",
        "prefect_gpt_image/flows/generate_images.py",
        "prefect_gpt_image/testing/emulator.py",
        "prefect_gpt_image/py.typed",
        "prefect_gpt_image/assets/logo.png",
    ):
        assert module in names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))
    )
    assert b"[prefect.collections]" in entry_points
