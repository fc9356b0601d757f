"""Text sources: the built-in corpora (no download) and user files.

Sources are registered by name (``@register_source``) and return one string. The built-in
``stdlib`` source is real code-and-prose text that every Python installation already has:
the standard library's own ``.py`` files, in sorted path order, capped at ``max_bytes``. It
is deterministic for a given Python installation; machines with different Python versions
see different text, which is why :func:`fingerprint` exists (ranks can compare it).

``shakespeare`` is public-domain English prose and verse vendored as package data
(``commtrain/data/texts/shakespeare/``, ~1.5 MB; source and licence in its README.md): a
corpus *different* from the stdlib code, the same bytes on every machine, for fine-tuning.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from importlib import resources
from pathlib import Path
from typing import Callable

from ..registry import Registry

_SOURCES: Registry[Callable[..., str]] = Registry("data source")

# Directories of the stdlib that are not the library itself (third-party packages, the
# regression-test suite) or are bulky generated data.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test", "encodings"}
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


register_source = _SOURCES.register
available_sources = _SOURCES.names


def load_text(source: str, path=None, max_bytes: int | None = None, text_field: str = "text") -> str:
    text = _SOURCES.get(source, "data.source")(path=path, text_field=text_field, max_bytes=max_bytes)
    if max_bytes is not None:
        # Cap in bytes (what the byte tokenizer sees); a cut multi-byte char is replaced.
        raw = text.encode("utf-8")
        if len(raw) > max_bytes:
            text = raw[:max_bytes].decode("utf-8", errors="replace")
    return text


def fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stdlib_files() -> list[Path]:
    """The stdlib's .py files sorted by relative path (skipped directories are never entered:
    site-packages alone can hold gigabytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@register_source("stdlib")
def _stdlib(path=None, text_field="text", max_bytes: int | None = None) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in stdlib_files():
        body = f.read_bytes().decode("utf-8", errors="replace")
        parts.append(f"# ---- {f.relative_to(root).as_posix()} ----\n{body}\n")
        total += len(parts[-1].encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:  # load_text() cuts exactly
            break
    if not parts:
        raise ValueError(f"data.source='stdlib': no .py files under {root}")
    return "".join(parts)


def vendored_files(name: str) -> list:
    """The ``*.txt`` files of the vendored corpus ``name`` (package data under
    ``commtrain/data/texts/<name>/``), sorted by file name."""
    root = resources.files("commtrain.data").joinpath("texts", name)
    files = sorted((f for f in root.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name) if root.is_dir() else []
    if not files:
        raise ValueError(f"data.source={name!r}: no vendored texts under {root}; the package data is missing (reinstall commtrain)")
    return files


@register_source("shakespeare")
def _shakespeare(path=None, text_field="text", max_bytes: int | None = None) -> str:
    # Works are joined by one blank line, as data.source='files' joins documents.
    return "\n\n".join(f.read_bytes().decode("utf-8") for f in vendored_files("shakespeare"))


def resolve_paths(path) -> list[Path]:
    """A path, directory, glob, comma-separated string or list of those -> sorted files."""
    if path is None or path == "" or path == []:
        raise ValueError("data.path is required for data.source='files'; allowed: a file, directory, glob or list")
    entries = [p for item in ([path] if isinstance(path, (str, Path)) else path) for p in str(item).split(",") if p]
    files: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if any(c in entry for c in "*?["):
            matched = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
        elif p.is_dir():
            matched = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        elif p.is_file():
            matched = [p]
        else:
            raise ValueError(f"data.path={entry!r} does not exist")
        if not matched:
            raise ValueError(f"data.path={entry!r} matched no text (.txt, ...) or JSONL files")
        files.extend(matched)
    return files


def _read_jsonl(f: Path, text_field: str) -> list[str]:
    docs = []
    for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data.path: {f}:{lineno} is not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise ValueError(f"data.path: {f}:{lineno} has no string field {text_field!r} (data.text_field)")
        docs.append(rec[text_field])
    return docs


@register_source("files")
def _files(path=None, text_field="text", max_bytes: int | None = None) -> str:
    docs: list[str] = []
    for f in resolve_paths(path):
        if f.suffix in JSONL_SUFFIXES:
            docs.extend(_read_jsonl(f, text_field))
        else:
            docs.append(f.read_bytes().decode("utf-8", errors="replace"))
    text = "\n\n".join(docs)  # documents separated by a blank line (no special token in byte vocab)
    if not text:
        raise ValueError(f"data.path={path!r}: the files contain no text")
    return text
