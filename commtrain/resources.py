"""YAML files that ship inside the package, found by name; or a user's own file, by path.

Three kinds of resource are package data (``pyproject.toml``, ``[tool.setuptools.package-data]``),
read through :mod:`importlib.resources` so that a plain ``pip install`` (not editable) finds
them from any working directory:

==========================  =====================================================  =====================
kind                        packaged under                                         read by
==========================  =====================================================  =====================
link profile                ``commtrain/comm/link_profiles/<name>.yaml``           ``link.profile``
hardware profile            ``commtrain/perfmodel/hardware_profiles/<name>.yaml``  ``commtrain compare``
interconnect (NIC) profile  ``.../hardware_profiles/interconnects/<name>.yaml``    hardware profiles
example config              ``commtrain/configs/<name>.yaml``                      ``--config NAME``
==========================  =====================================================  =====================

Everywhere a name is accepted, a path works too. The rule (:func:`find`): an existing file,
or anything that looks like a path (a ``.yaml``/``.yml`` suffix or a directory separator),
is read as a path; any other string is the name of a packaged file.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Union

try:  # Python >= 3.11
    from importlib.resources.abc import Traversable
except ImportError:  # Python 3.10
    from importlib.abc import Traversable

Resource = Union[Path, Traversable]
SUFFIXES = (".yaml", ".yml")


def directory(package: str, *parts: str) -> Traversable:
    """The packaged folder ``parts`` inside ``package`` (e.g. ``("commtrain.comm", "link_profiles")``)."""
    return resources.files(package).joinpath(*parts)


def names(folder: Traversable) -> list[str]:
    """Names (file stems) of the ``.yaml`` files in a packaged folder, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.is_file() and p.name.endswith(".yaml"))


def looks_like_path(name: str) -> bool:
    return name.endswith(SUFFIXES) or os.sep in name or (os.altsep is not None and os.altsep in name)


def find(name: str | os.PathLike, folder: Traversable, kind: str) -> Resource:
    """The file ``name`` stands for: a path to an existing file, or ``<folder>/<name>.yaml``.

    ``kind`` names the resource in the one-line error, which lists the packaged names.
    """
    available = ", ".join(names(folder))
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{kind}={name!r} is invalid; allowed: {available} or a path to a YAML file")
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if looks_like_path(name):
        raise ValueError(f"{kind} file {name!r} does not exist (packaged {kind}s: {available})")
    packaged = folder.joinpath(f"{name}.yaml")
    if packaged.is_file():
        return packaged
    raise ValueError(f"{kind} {name!r} not found; available: {available} (or a path to a YAML file)")


def is_packaged(name: str, folder: Traversable) -> bool:
    """Is ``name`` the name of a packaged file (and not a path)?"""
    return isinstance(name, str) and bool(name) and not looks_like_path(name) and folder.joinpath(f"{name}.yaml").is_file()
