"""Dependencies that say what they are (pyproject.toml, requirements/*.txt, infra/lock.py).

Every third-party import of the package, read from the source (module- and function-level alike), is declared
in the extra that ships its module: the device side (edgeship/device/ and what it imports from edgeship) in
`device`, its runtime adapters in `litert`/`coreml`/`tensorrt`, the LiteRT and TensorFlow converters in their
own environments' locks, everything else in `pipeline`; the tests' and benchmarks' in `dev` or `pipeline`.
The install's locks are exact, hashed, sorted and satisfy every range pyproject declares. And `edgeship[device]`
installs alone, in a fresh environment, and every device module imports there without the pipeline's packages.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from test_import_graph import import_graph

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))
import lock  # noqa: E402

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Modules whose imports another extra (or another environment) provides; everything else on the device side is
# `device`, and the rest of the package `pipeline`.
RUNTIME_MODULES = {
    "edgeship.device.runtimes.litert_session": "litert",
    "edgeship.device.runtimes.coreml_session": "coreml",
    "edgeship.device.runtimes.tensorrt_session": "tensorrt",
    "edgeship.device.tensorrt_build": "tensorrt",
}
CONVERTER_MODULES = {  # run as scripts inside their own environments (edgeship/tasks/compile/litert.py)
    "edgeship.tasks.compile.litert_convert": "litert-converter.txt",
    "edgeship.tasks.compile.tf_convert": "tf-converter.txt",
}
NOT_ON_PYPI = {"tensorrt": "comes with JetPack or from NVIDIA's own index (the tensorrt extra says so)"}
# Import names of packages this .venv does not hold (they live in the converter environments).
DISTRIBUTION_OF = {"litert_torch": "litert-torch", "ai_edge_quantizer": "ai-edge-quantizer",
                   "tensorflow": "tensorflow", "onnx2tf": "onnx2tf"}
FORBIDDEN_ON_DEVICE = ("torch", "tensorflow", "mlflow", "prefect", "sqlalchemy")


def third_party_imports(source: Path) -> set[str]:
    """Top-level names of everything `source` imports that is neither the standard library nor edgeship."""
    names = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "edgeship"}


@cache
def modules() -> dict[str, Path]:
    found = {}
    for source in (REPO / "edgeship").rglob("*.py"):
        parts = list(source.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = source
    return found


@cache
def device_side() -> frozenset[str]:
    """edgeship.device and every edgeship module it imports, transitively."""
    graph = import_graph()
    seen, stack = set(), [m for m in graph if m.startswith("edgeship.device")]
    while stack:
        module = stack.pop()
        if module not in seen:
            seen.add(module)
            stack.extend(graph[module])
    return frozenset(seen)


@cache
def declared(extra: str | None) -> frozenset[str]:
    """Normalized names of the distributions an extra declares (None: the base install), its own extras included."""
    names = {lock.normalized(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    for text in PYPROJECT["project"]["optional-dependencies"].get(extra, []) if extra else []:
        requirement = Requirement(text)
        if requirement.name == "edgeship":
            for included in requirement.extras:
                names |= declared(included)
        else:
            names.add(lock.normalized(requirement.name))
    return frozenset(names)


@cache
def installed() -> dict[str, list[str]]:
    return packages_distributions()  # import name -> distributions; reads every installed one, so once


def distributions(name: str) -> set[str]:
    """The distributions that provide import name `name` (as installed here, or as the converters name them)."""
    found = installed().get(name) or [DISTRIBUTION_OF.get(name, name)]
    return {lock.normalized(d) for d in found}


def undeclared(imports: set[str], provided: set[str]) -> list[str]:
    return sorted(n for n in imports if n not in NOT_ON_PYPI and not distributions(n) & provided)


def test_every_import_of_the_package_is_declared_in_the_extra_that_ships_its_module():
    device = device_side()
    missing = {}
    for module, source in modules().items():
        if module in CONVERTER_MODULES:
            _, pinned, _ = lock.read(REPO / "requirements" / CONVERTER_MODULES[module])
            extra, provided = CONVERTER_MODULES[module], set(pinned)
        else:
            extra = RUNTIME_MODULES.get(module) or ("device" if module in device else "pipeline")
            provided = set(declared(extra)) | (set(declared("device")) if extra in RUNTIME_MODULES.values() else set())
        gaps = undeclared(third_party_imports(source), provided)
        if gaps:
            missing[module] = f"{extra}: {gaps}"
    assert not missing, f"imports no extra declares (add them to pyproject.toml and the lock): {missing}"


def test_the_device_side_declares_nothing_of_the_pipelines():
    assert not {lock.normalized(n) for n in FORBIDDEN_ON_DEVICE} & (declared("device") | declared("litert")
                                                                     | declared("coreml") | declared("tensorrt"))
    for module in device_side() - set(RUNTIME_MODULES):
        forbidden = third_party_imports(modules()[module]) & set(FORBIDDEN_ON_DEVICE)
        assert not forbidden, f"{module} imports {forbidden}"


def test_every_import_of_the_tests_and_benchmarks_is_declared():
    local = {p.stem for folder in ("tests", "benchmarks", ".ci", "infra") for p in (REPO / folder).glob("*.py")}
    provided = set(declared("pipeline")) | set(declared("dev"))
    missing = {str(source.relative_to(REPO)): gaps for folder in ("tests", "benchmarks")
               for source in sorted((REPO / folder).glob("*.py"))
               if (gaps := undeclared(third_party_imports(source) - local, provided))}
    assert not missing, f"imports neither `dev` nor `pipeline` declares: {missing}"


def test_locks_are_exact_hashed_and_sorted():
    for path in lock.LOCKS:
        _, entries, problems = lock.read(path)
        assert not problems, "\n".join(problems)
        assert all(re.fullmatch(r"[0-9][0-9a-z.+!]*", version) for _, version, _ in entries.values()), path


def test_the_lock_satisfies_every_range_the_install_declares():
    """What infra/install.sh installs (the lock, --no-deps for edgeship itself) is what pyproject asks for."""
    _, pinned, _ = lock.read(REPO / "requirements" / "constraints.txt")
    unmet = []
    for extra in ("pipeline", "dev"):
        for text in [*PYPROJECT["project"]["dependencies"], *_flattened(extra)]:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue
            found = pinned.get(lock.normalized(requirement.name))
            if found is None or not requirement.specifier.contains(found[1], prereleases=True):
                unmet.append(f"{text} ({'not in the lock' if found is None else found[1]})")
    assert not unmet, f"requirements/constraints.txt does not satisfy: {sorted(set(unmet))}"


def _flattened(extra: str) -> list[str]:
    texts = []
    for text in PYPROJECT["project"]["optional-dependencies"][extra]:
        requirement = Requirement(text)
        if requirement.name == "edgeship":
            texts += [t for included in sorted(requirement.extras) for t in _flattened(included)]
        else:
            texts.append(text)
    return texts


def test_pyproject_lists_one_requirement_per_line_sorted_by_name():
    """So that several branches adding dependencies merge line by line."""
    lists = {"dependencies": PYPROJECT["project"]["dependencies"], **PYPROJECT["project"]["optional-dependencies"]}
    for name, requirements in lists.items():
        names = [lock.normalized(Requirement(r).name) for r in requirements]
        assert names == sorted(names) and len(set(names)) == len(names), f"{name}: {names}"


def test_the_device_extra_installs_alone_and_every_device_module_imports(tmp_path):
    """`pip install edgeship[device]` into a fresh environment (pins from the lock, so pip's cache serves it)."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "edgeship", source / "edgeship", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    _, pinned, _ = lock.read(REPO / "requirements" / "constraints.txt")
    (tmp_path / "pins.txt").write_text("".join(f"{name}=={version}\n" for name, version, _ in pinned.values()))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    subprocess.run([*pip, "install", "-q", "-c", str(tmp_path / "pins.txt"), f"{source}[device]"], check=True,
                   timeout=900)
    subprocess.run([*pip, "check"], check=True)
    probe = f"""
import importlib, importlib.util, pkgutil, sys
import edgeship.device
absent = [m for m in {FORBIDDEN_ON_DEVICE!r} if importlib.util.find_spec(m) is not None]
assert not absent, f"installed without being asked for: {{absent}}"
names = [m.name for m in pkgutil.walk_packages(edgeship.device.__path__, "edgeship.device.")]
for name in names:
    importlib.import_module(name)
loaded = [m for m in {FORBIDDEN_ON_DEVICE!r} if m in sys.modules]
assert not loaded, loaded
print(len(names))
"""
    imported = subprocess.run([str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert int(imported.stdout) >= len([m for m in modules() if m.startswith("edgeship.device.")])
    version = subprocess.run([str(venv / "bin" / "edgeship-device"), "--version"], capture_output=True, text=True,
                             env={**os.environ, "PATH": str(venv / "bin")})
    assert version.returncode == 0 and version.stdout.startswith("edgeship-device "), version.stderr
