"""tools/fetch_gpu_wheels.sh without network: its list is exactly the project's runtime dependencies
that the GPU image lacks, plus their dependencies the image lacks; pins match pyproject.toml and
the versions this environment installs and tests; the script is shellcheck-clean.

The GPU image (docs/gpu-validation.md): Python 3.12 with torch, transformers, safetensors,
sentencepiece, tensorboard, einops, psutil, numpy, pyarrow, matplotlib, requests, tqdm, pytest.
Dependency closures are read from the installed distributions' metadata (markers evaluated for
Python 3.12 on Linux x86-64), so what the image's packages pull in counts as present.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from launch import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SCRIPT = REPO / "tools" / "fetch_gpu_wheels.sh"
IMAGE = ["torch", "transformers", "safetensors", "sentencepiece", "tensorboard", "einops", "psutil",
         "numpy", "pyarrow", "matplotlib", "requests", "tqdm", "pytest"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def script_pins() -> dict[str, str]:
    """name → version of every `name==version` line in the WHEELS and BUILT arrays."""
    text = SCRIPT.read_text()
    pins: dict[str, str] = {}
    for array in ("WHEELS", "BUILT"):
        body = re.search(rf"^{array}=\((.*?)^\)", text, re.S | re.M)
        assert body, f"no {array}=( ... ) array in {SCRIPT.name}"
        for line in body.group(1).splitlines():
            line = line.split("#")[0].strip()
            if line:
                name, _, version = line.partition("==")
                assert version, f"{line!r} is not pinned with =="
                pins[canonicalize_name(name)] = version
    return pins


def project_requirements() -> list[Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(r) for r in data["project"]["dependencies"]]


def closure(names) -> set[str]:
    """The names plus everything they require at run time on the target, transitively."""
    seen: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for r in md.distribution(name).requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate(TARGET):
                todo.append(canonicalize_name(req.name))
    return seen


def test_the_list_is_what_the_image_lacks():
    missing_direct = {canonicalize_name(r.name) for r in project_requirements()} - \
        {canonicalize_name(n) for n in IMAGE}
    assert missing_direct == {"megatron-core", "reasoning-gym", "math-verify", "pebble", "fastapi",
                              "uvicorn"}
    expected = closure(missing_direct) - closure(IMAGE)
    listed = set(script_pins())
    assert listed == expected, (f"listed but not needed: {sorted(listed - expected)}; "
                                f"needed but not listed: {sorted(expected - listed)}")


def test_pins_are_the_tested_versions():
    pins = script_pins()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        if name in pins:
            exact = [s.version for s in req.specifier if s.operator == "=="]
            if exact:
                assert pins[name] == exact[0], f"{name}: pyproject pins {exact[0]}, script {pins[name]}"
    for name, version in pins.items():
        assert md.version(name) == version, \
            f"{name}: the script brings {version}, this environment tests {md.version(name)}"


def test_script_is_shellcheck_clean():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    here = str(Path(sys.executable).parent)
    shellcheck = shutil.which("shellcheck", path=here) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: install the test extra (pip install -e '.[test]')"
    out = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_wheel_folder_is_ignored_by_git():
    assert "gpu_wheels/" in (REPO / ".gitignore").read_text().split(), "gpu_wheels/ must be in .gitignore"
