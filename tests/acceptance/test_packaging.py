"""The distribution installs one import package, rabbit_archive, and nothing else at top level."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance

ROOT = Path(__file__).resolve().parents[2]
LIST_FILES = """
import importlib.metadata as m
print("\\n".join(sorted({str(f).split("/")[0] for f in m.files("rabbit-archive")})))
"""


def test_a_fresh_install_puts_exactly_one_top_level_package(tmp_path: Path) -> None:
    def run(*command: str | Path) -> str:
        result = subprocess.run(
            [str(part) for part in command], capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", tmp_path / "dist", ROOT)
    [wheel] = (tmp_path / "dist").glob("rabbit_archive-*.whl")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps", wheel)
    top_level = run(venv / "bin" / "python", "-c", LIST_FILES).split()
    assert [name for name in top_level if not name.endswith(".dist-info") and name != ".."] == [
        "rabbit_archive"
    ]
    # The migrations and the canonical schema travel with the code.
    installed = run(
        venv / "bin" / "python",
        "-c",
        "import importlib.metadata as m; print('\\n'.join(str(f) for f in m.files('rabbit-archive')))",
    ).split()
    assert "rabbit_archive/archive/schema.sql" in installed
    assert any(name.startswith("rabbit_archive/archive/migrations/0001_") for name in installed)
    assert "rabbit_archive/capture/cli.py" in installed
    assert "rabbit_archive/inbox/__init__.py" in installed  # the consumer kit, for applications
    # The web console's templates and assets ship inside the package: no CDN at run time.
    for asset in (
        "templates/search.html",
        "templates/message.html",
        "static/console.js",
        "static/console.css",
    ):
        assert f"rabbit_archive/replay/web/{asset}" in installed, asset
