"""The built-in corpus: docstrings of the installed Python standard library, plus pydoc's help topics.

It exists on every machine without a download, and it is the same text on every machine with the same
Python version: files are visited in sorted order and docstrings in source order.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> list[Path]:
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus_key() -> str:
    """Identifies the corpus text without reading it: Python version and the stdlib files' names and sizes."""
    root = stdlib_root()
    h = hashlib.sha256(f"builtin-corpus-v1 {sys.version_info[:3]} {sys.implementation.name}".encode())
    for p in _source_files(root):
        h.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _docstrings(node: ast.AST) -> Iterator[str]:
    if isinstance(node, _DOC_NODES):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def iter_documents() -> Iterator[str]:
    """One document per module (all its docstrings, blank-line separated), then one per pydoc help topic."""
    root = stdlib_root()
    for path in _source_files(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):
            continue  # a few stdlib files are deliberately invalid (lib2to3 test data and the like)
        docs = list(_docstrings(tree))
        if docs:
            yield "\n\n".join(docs)
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return
    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text
