"""The repo's shape: scripts never import scripts, the training script stays short, functions stay small, and a
mechanism that must exist once (the atomic write) exists once."""
from __future__ import annotations

import ast

from conftest import ROOT

MODULES = sorted(p for p in ROOT.glob("*.py"))


def _tree(path):
    return ast.parse(path.read_text(encoding="utf-8"))


SCRIPTS = {"train_unet_busi", "predict_busi", "inspect_busi_predictions_gui", "bench_busi"}  # the commands


def test_no_module_imports_a_script():
    """Scripts share code through modules (dataset.py's CLI is a module's convenience, not a command of its own)."""
    offenders = []
    for path in MODULES:
        for node in ast.walk(_tree(path)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offenders += [f"{path.name} imports {n}" for n in names if n in SCRIPTS]
    assert offenders == []


def test_training_script_is_short_and_functions_are_small():
    assert len((ROOT / "train_unet_busi.py").read_text().splitlines()) < 400
    long = []
    for path in MODULES:
        tree = _tree(path)
        gui_methods = {id(f) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == "InspectorApp"
                       for f in ast.walk(c)}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and id(node) not in gui_methods:
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert long == []


def test_files_are_replaced_atomically_in_one_place():
    users = [p.name for p in MODULES if "os.replace(" in p.read_text(encoding="utf-8")]
    assert users == ["utils.py"]
