"""The repository's shape, as its readers rely on it: importing a module changes nothing a notebook set up, no
module imports an entry script, and nothing points outside the repository (a fresh clone has only itself)."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = {"main_train", "main_infer", "resume_train", "report", "export", "deploy", "bench", "to_coco", "convert"}


def python_files():
    return sorted(os.path.join(root, name) for root, dirs, names in os.walk(ROOT) for name in names
                  if name.endswith(".py") and not {".venv", ".venv-ci", ".git", "data"} & set(root.split(os.sep)))


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_importing_the_modules_keeps_the_notebooks_matplotlib_backend(backend):
    # a notebook's inline backend, played by one no module would choose: plt.show() must keep working after
    # `import solo_head`, so no import may switch the backend (the scripts choose Agg when run)
    code = (f"import matplotlib; matplotlib.use({backend!r}); "
            "import solo_head, dataset, plots, coco_eval, report, loss_log, engine, model; "
            "import matplotlib.pyplot as plt; plt.figure(); print(matplotlib.get_backend())")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == backend


def test_no_module_imports_an_entry_script():
    offenders = []
    for path in python_files():
        module = os.path.splitext(os.path.basename(path))[0]
        if os.sep + "tests" + os.sep in path or module in SCRIPTS:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{os.path.relpath(path, ROOT)} imports {n}" for n in names if n in SCRIPTS]
    assert not offenders


def test_tests_use_a_script_only_through_its_parser_and_main():
    uses = []
    for path in python_files():
        if os.sep + "tests" + os.sep not in path:
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module in SCRIPTS:
                uses += [f"{os.path.basename(path)}: from {node.module} import {a.name}" for a in node.names]
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in SCRIPTS \
                    and node.attr not in ("get_args_parser", "main"):
                uses.append(f"{os.path.basename(path)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not uses


def test_nothing_in_the_repository_points_outside_it():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    outside = "../" + "shared"  # spelled in two parts, so that this file does not match itself
    found = [name for name in tracked if os.path.isfile(os.path.join(ROOT, name))
             and outside in open(os.path.join(ROOT, name), errors="ignore").read()]
    assert not found
