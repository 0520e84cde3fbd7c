"""What a user installs: the wheel (package, py.typed, LICENSE, metadata) and the sdist (the whole development tree,
whose tests collect and pass from the unpacked folder)."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVELOPMENT_TREE = ("tests", "examples", "configs", "benchmarks", "docs")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source") / "pl-pmse"  # a copy: the build leaves build/ and egg-info behind
    skipped = (".venv", ".git", "__pycache__", "*.egg-info", "build", "wandb", "runs", "lightning_logs", ".*_cache")
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*skipped))
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def tracked(folder: str) -> set[str]:
    """Files of the repository under ``folder`` (git's list when this is a clone, else the files on disk)."""
    git = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    if git.returncode == 0 and git.stdout.strip():
        return {line for line in git.stdout.splitlines() if (ROOT / line).exists()}
    return {
        str(p.relative_to(ROOT)) for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }


def test_wheel_has_the_license_types_and_metadata(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
        (license_name,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert archive.read(license_name) == (ROOT / "LICENSE").read_bytes()
    assert "pl_pmse/py.typed" in names and "pl_pmse/lightning_compat.py" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    urls = dict(value.split(", ", 1) for value in metadata.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues", "Changelog"} <= set(urls)
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert {"lpips", "lightning", "examples", "dev"} <= set(metadata.get_all("Provides-Extra"))


def test_sdist_is_the_development_tree_and_its_tests_collect(dist: Path, tmp_path: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    (unpacked,) = tmp_path.iterdir()
    for folder in DEVELOPMENT_TREE:
        missing = {name for name in tracked(folder) if not (unpacked / name).exists()}
        assert not missing, f"the sdist lacks {sorted(missing)}"
    for name in ("LICENSE", "README.md", "CHANGELOG.md", "Makefile", "pl_pmse/py.typed"):
        assert (unpacked / name).exists(), name

    def collect(where: Path) -> str:
        done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                              cwd=where, capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        return done.stdout.strip().splitlines()[-1].split(" in ")[0]  # "N tests collected"

    assert collect(unpacked) == collect(ROOT)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_checks.py"],
                          cwd=unpacked, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]


def test_every_declared_dependency_is_used() -> None:
    """Each core dependency is imported by the package (by its import name)."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    import_names = {"pytorch-lightning": "pytorch_lightning", "typing-extensions": "typing_extensions"}
    source = "\n".join(path.read_text() for path in (ROOT / "pl_pmse").rglob("*.py"))
    for requirement in declared:
        name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
        module = import_names.get(name, name)
        assert re.search(rf"\b(import|from) {module}\b|\"{module}\"", source), f"{name} is declared but never imported"


def test_the_version_floors_checked_at_import_are_pyproject_s() -> None:
    import tomllib

    from pl_pmse.versions import MINIMUM, release

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["lightning"]
    floors = {}
    for requirement in requirements:
        found = re.match(r"([A-Za-z0-9_-]+)\s*>=\s*([0-9.]+)", requirement)
        assert found, requirement
        floors[found.group(1)] = release(found.group(2))
    assert {distribution: oldest for distribution, oldest in MINIMUM.values()} == {
        name: floors[name] for name, _ in MINIMUM.values()
    }
    floors_installed_by_ci = (ROOT / ".ci/floors.in").read_text()
    for distribution, oldest in MINIMUM.values():  # make test-floors runs exactly these
        assert re.search(rf"^{distribution}=={'.'.join(map(str, oldest))}(\.0)?$", floors_installed_by_ci, re.M)


def test_a_release_older_than_the_floor_is_named_with_the_one_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from pl_pmse.versions import require

    old = types.ModuleType("torchaudio")
    old.__version__, old.__file__ = "2.3.1", "/site-packages/torchaudio/__init__.py"
    monkeypatch.setitem(sys.modules, "torchaudio", old)
    with pytest.raises(ImportError, match=r"needs torchaudio >= 2\.4, found 2\.3\.1 .*pip install --upgrade"):
        require.__wrapped__("torchaudio")
    old.__version__ = "2.4.0+cpu"  # the floor itself, with a local build tag
    assert require.__wrapped__("torchaudio") is old
    # an old torch: the error comes when pl-pmse is imported, not as an AttributeError at first use
    code = "import torch; torch.__version__ = '2.3.1+cu121'; import pl_pmse"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    assert "ImportError: pl-pmse needs torch >= 2.4, found 2.3.1+cu121" in done.stderr, done.stderr[-2000:]
