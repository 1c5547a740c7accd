"""The Python version the project promises is the one it is tested with, said alike everywhere.

setup.py's ``python_requires`` is what pip enforces; the README's "Two commands" section is
what a reader sees.  Only a version that CI actually runs may be promised: no older
interpreter is installable on the development and CI machines, so nothing checks the code
against one.
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_python_requires() -> str:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "python_requires":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py passes no python_requires to setup()")


def _minimum(spec: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*>=\s*(\d+)\.(\d+)\s*", spec)
    assert m, f"python_requires {spec!r}: expected a plain lower bound '>=X.Y'"
    return int(m.group(1)), int(m.group(2))


def _readme_versions() -> list[tuple[int, int]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(int(a), int(b)) for a, b in re.findall(r"\bPython (\d+)\.(\d+)\+?", text)]


def test_readme_states_the_version_setup_py_requires():
    minimum = _minimum(_setup_python_requires())
    stated = _readme_versions()
    assert stated, "README.md names no Python version ('Python X.Y')"
    assert set(stated) == {minimum}, f"README.md says Python {stated}, setup.py requires >= {minimum}"


def test_the_interpreter_running_the_tests_meets_the_promise():
    assert sys.version_info[:2] >= _minimum(_setup_python_requires())
