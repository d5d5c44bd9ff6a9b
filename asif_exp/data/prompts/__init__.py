"""Built-in class names and prompt templates for zero-shot classification.

Data files live next to this module and ship as package data:

* ``classnames/<name>.txt``: one class name per line, in the dataset's
  standard label order (line ``i`` is the name of label ``i``).
* ``templates/<name>.txt``: one prompt template per line, each with exactly
  one ``{}`` placeholder for the class name (``template.format(name)``).
* ``class_ids/<name>.txt``: the dataset's own id of each class of
  ``classnames/<name>.txt``, line for line (ImageNet: the wnid of label ``i``,
  the standard ILSVRC2012 order, i.e. the sorted wnids).

Sources: class names and templates follow OpenAI CLIP's ``data/prompts.md``
and ``notebooks/Prompt_Engineering_for_ImageNet.ipynb`` (CIFAR-10/100, the 80
ImageNet templates and their 7-template subset, the curated ImageNet names),
as collected in LAION's CLIP_benchmark ``en_classnames.json`` (Oxford-IIIT
Pets names). ``oxford_pets_asif`` and ``pets3`` are the ASIF authors' Pets
class names (breed + " cat"/" dog") and templates.
"""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; only needed for annotations
    from importlib.resources.abc import Traversable

__all__ = [
    "available_class_names",
    "available_templates",
    "load_class_ids",
    "load_class_names",
    "load_templates",
]

_CLASSNAMES = "classnames"
_TEMPLATES = "templates"
_CLASS_IDS = "class_ids"
_SUFFIX = ".txt"


def _resource_dir(kind: str) -> Traversable:
    """Folder holding the data files of one kind (``classnames``/``templates``)."""
    return resources.files(__name__).joinpath(kind)


def _available(kind: str) -> list[str]:
    folder = _resource_dir(kind)
    return sorted(
        entry.name[: -len(_SUFFIX)]
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(_SUFFIX)
    )


def _read(kind: str, name: str) -> tuple[str, str]:
    """Text of ``<kind>/<name>.txt`` and a label for error messages."""
    available = _available(kind)
    if name not in available:
        what = {_CLASSNAMES: "class-name list", _CLASS_IDS: "class-id list"}.get(
            kind, "template set"
        )
        raise ValueError(f"unknown {what} {name!r}; available: {', '.join(available) or '(none)'}")
    source = f"{kind}/{name}{_SUFFIX}"
    text = _resource_dir(kind).joinpath(name + _SUFFIX).read_text(encoding="utf-8")
    return text, source


def _parse_lines(text: str, source: str) -> list[str]:
    """Stripped lines of ``text``; an empty line is an error (it would shift labels)."""
    lines = [line.strip() for line in text.splitlines()]
    for lineno, line in enumerate(lines, start=1):
        if not line:
            raise ValueError(f"{source}, line {lineno}: empty line")
    return lines


def _parse_class_names(text: str, source: str) -> list[str]:
    names = _parse_lines(text, source)
    if not names:
        raise ValueError(f"{source}: no class names")
    return names


def parse_templates(text: str, source: str) -> list[str]:
    """Parse a template file: each line must hold exactly one ``{}`` and no other braces."""
    templates = _parse_lines(text, source)
    if not templates:
        raise ValueError(f"{source}: no templates")
    for lineno, template in enumerate(templates, start=1):
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ValueError(
                f"{source}, line {lineno}: template {template!r} must contain "
                "exactly one '{}' placeholder and no other braces"
            )
    return templates


def available_class_names() -> list[str]:
    """Names accepted by :func:`load_class_names`, sorted."""
    return _available(_CLASSNAMES)


def available_templates() -> list[str]:
    """Names accepted by :func:`load_templates`, sorted."""
    return _available(_TEMPLATES)


def load_class_names(name: str) -> list[str]:
    """Class names of a built-in list, in the dataset's label order.

    Raises ``ValueError`` for an unknown ``name`` (the message lists the
    available ones) or a malformed file.
    """
    text, source = _read(_CLASSNAMES, name)
    return _parse_class_names(text, source)


def load_templates(name: str) -> list[str]:
    """Prompt templates of a built-in set; each has exactly one ``{}``.

    Raises ``ValueError`` for an unknown ``name`` (the message lists the
    available ones) or for a line without exactly one ``{}`` (the message
    names the file and line number).
    """
    text, source = _read(_TEMPLATES, name)
    return parse_templates(text, source)


def load_class_ids(name: str) -> list[str]:
    """The dataset's ids of the classes of the built-in list `name` (ImageNet's wnids), in
    label order: line ``i`` is the id of label ``i``."""
    text, source = _read(_CLASS_IDS, name)
    ids = _parse_class_names(text, source)
    names = load_class_names(name)
    if len(ids) != len(names) or len(set(ids)) != len(ids):
        raise ValueError(f"{source}: {len(set(ids))} distinct ids for {len(names)} classes")
    return ids
