"""The installed package stands on its own: the core needs torch only, nothing imports the source tree."""

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "imbsam_fast"
CORE_OK = {"torch", "triton", "imbsam_fast", "__future__"}
STDLIB = set(sys.stdlib_module_names)


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_core_modules_import_torch_and_the_standard_library_only():
    for path in PACKAGE.rglob("*.py"):
        if "apps" in path.relative_to(PACKAGE).parts:
            continue
        bad = {m for m in _imports(path) if m not in CORE_OK and m not in STDLIB}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_nothing_in_the_package_touches_sys_path_or_the_source_tree():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text, path
        mods = set(_imports(path))
        assert not mods & {"tests", "benchmarks", "reference", "shapes", "step_time", "gpu_check"}, path


def test_importing_the_core_does_not_load_the_applications_or_their_dependencies():
    """Whatever ``import torch`` loads by itself (it may pull numpy) is not ours to count."""
    code = ("import sys, torch; before = set(sys.modules); import imbsam_fast; "
            "new = set(sys.modules) - before; bad = sorted(m for m in new if m.split('.')[0] in "
            "('numpy', 'sklearn', 'matplotlib', 'tqdm', 'PIL') or m.startswith('imbsam_fast.apps')); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
