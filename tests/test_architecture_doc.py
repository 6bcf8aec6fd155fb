"""docs/architecture.md matches the tree, and the model's own files never import a device package.

* Every module under ``model/`` and ``app/`` (each ``*.py``, and each file of ``app/web/`` and
  ``model/cpu/csrc/``) has its one line in the layout: a list item starting with its path in
  backticks. Every ``model/…`` or ``app/…`` path the page names exists.
* No file under ``model/`` imports ``model.cpu`` or ``model.cuda`` (absolute or relative, at the top
  or lazily inside a function) except ``model/accelerate.py``, the bridge, ``model/placement.py``,
  which gives experts kept on the CPU the CPU's treatment, and the device packages themselves.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
DEVICE_PACKAGES = ("cpu", "cuda")
MAY_IMPORT_DEVICE = {"model/accelerate.py", "model/placement.py"}

# A layout line: "- `path` — what it is".
LISTED = re.compile(r"^- `([^`]+)`", re.MULTILINE)
# Any path under model/ or app/ named on the page, in backticks, prose or the diagram.
NAMED = re.compile(r"(?<![\w./-])((?:model|app)/[\w./-]*)")
# importlib.import_module("model.cpu…") / __import__("model.cuda…"): an import by name.
IMPORT_BY_NAME = re.compile(r"""(?:import_module|__import__)\(\s*["'](?:model\.|\.+)(?:cpu|cuda)\b""")


def _relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def modules() -> list[str]:
    """Every file the layout must list: Python modules of model/ and app/, the browser's files, the C source."""
    found = {
        _relative(path)
        for folder in ("model", "app")
        for path in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    for folder in ("app/web", "model/cpu/csrc"):
        found |= {_relative(path) for path in (ROOT / folder).iterdir() if path.is_file()}
    return sorted(found)


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def test_every_module_has_its_line_in_the_layout():
    listed = LISTED.findall(_doc())
    missing = [path for path in modules() if path not in listed]
    assert missing == [], f"docs/architecture.md has no layout line ('- `path` — …') for: {', '.join(missing)}"


def test_each_module_is_listed_once():
    listed = LISTED.findall(_doc())
    twice = sorted({path for path in listed if listed.count(path) > 1})
    assert twice == [], f"docs/architecture.md lists these more than once: {', '.join(twice)}"


def test_every_path_the_page_names_exists():
    text = _doc()
    named = set(LISTED.findall(text)) | {match.rstrip(".") for match in NAMED.findall(text)}
    stale = sorted(path for path in named if not (ROOT / path).exists())
    assert stale == [], f"docs/architecture.md names paths that do not exist: {', '.join(stale)}"


def imported_names(source: str) -> list[tuple[int, str]]:
    """(line, dotted target) for every import in ``source``, at any depth; relative ones keep their dots."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found.append((node.lineno, base))
            joiner = "" if base.endswith(".") else "."
            found += [(node.lineno, base + joiner + alias.name) for alias in node.names]
    return found


def device_imports(source: str) -> list[int]:
    """Lines of ``source`` that import a device package (``model.cpu``, ``.cuda``, ``..cpu.kernels``…)."""
    device = re.compile(rf"^(?:model\.|\.+)(?:{'|'.join(DEVICE_PACKAGES)})(?:\.|$)")
    lines = {line for line, target in imported_names(source) if device.match(target)}
    lines |= {number for number, text in enumerate(source.splitlines(), start=1) if IMPORT_BY_NAME.search(text)}
    return sorted(lines)


@pytest.mark.parametrize(
    "source",
    [
        "from .cpu import accelerate\n",
        "from ..cuda.graphs import capture_graphs\n",
        "from . import cuda\n",
        "from model import cpu as device\n",
        "from model.cpu.kernels import CpuLinear\n",
        "import model.cuda.attention\n",
        "def lazy():\n    from .cpu.native import NativeDecodeStep\n",
        "from model import (\n    grounding,\n    cuda,\n)\n",
        "import importlib\nimportlib.import_module('model.cpu.decode')\n",
    ],
)
def test_the_check_sees_every_form_of_a_device_import(source):
    assert device_imports(source) != []


@pytest.mark.parametrize(
    "source",
    [
        "from .compute_thread import run\n",
        "import torch.cuda\n",
        "from torch import cuda\n",
        "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n",
        "from .cpus import x\n",
        '"""from .cpu import accelerate — in a docstring"""\n',
    ],
)
def test_the_check_lets_other_imports_be(source):
    assert device_imports(source) == []


def test_the_model_never_imports_a_device_package():
    offenders = []
    for path in sorted((ROOT / "model").rglob("*.py")):
        name = _relative(path)
        if name in MAY_IMPORT_DEVICE or name.startswith(tuple(f"model/{p}/" for p in DEVICE_PACKAGES)):
            continue
        offenders += [f"{name}:{line}" for line in device_imports(path.read_text(encoding="utf-8"))]
    assert offenders == [], (
        "these model files import a device package (model/cpu/, model/cuda/); "
        f"install device speed through model/accelerate.py instead: {', '.join(offenders)}"
    )


@pytest.mark.parametrize("package", DEVICE_PACKAGES)
def test_each_device_package_exposes_one_accelerate_entry_point(package):
    tree = ast.parse((ROOT / "model" / package / "__init__.py").read_text(encoding="utf-8"))
    entry = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "accelerate"]
    assert entry == ["accelerate"], f"model/{package}/__init__.py defines no top-level accelerate(model)"
