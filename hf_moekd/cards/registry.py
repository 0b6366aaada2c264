"""Card sections of the methods: each method registers its own (as peft's `register_peft_method`), so the card
code names none of them.

A method package calls `register_card_method(CardMethod(...))` when imported, ships `methods/<name>.md` (a Jinja
template, included in the card's "Method" section) and lists itself in the `hf_moekd.methods` entry-point group
of its distribution, so a card for one of its models can be written from a fresh interpreter::

    [project.entry-points."hf_moekd.methods"]
    my_method = "my_package.my_method"
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points

METHODS_GROUP = "hf_moekd.methods"


@dataclass(frozen=True)
class CardMethod:
    """What a model card says about one method."""

    name: str
    title: str  # the section's heading
    tags: tuple[str, ...] = ()  # Hub tags of models made with it
    recognises: Callable[[dict, dict], bool] | None = None
    """(config.json, all_results.json) -> True when a folder without recorded facts was made with this method."""
    results_table: Callable[[dict], str | None] | None = None
    """all_results.json -> a Markdown table for the section (the template reads it as `tables[name]`)."""
    template_dir: str | None = None
    """Folder holding `methods/<name>.md`; None: hf_moekd's own model_cards/."""


_METHODS: dict[str, CardMethod] = {}
_loaded = False


def register_card_method(method: CardMethod) -> CardMethod:
    """Make `method`'s card section available under `method.name` (again with the same definition is a no-op)."""
    known = _METHODS.get(method.name)
    if known is not None and known != method:
        raise ValueError(f"a card method named {method.name!r} is already registered ({known.title!r})")
    _METHODS[method.name] = method
    return method


def card_methods() -> dict[str, CardMethod]:
    """Every registered method, after importing the packages of the `hf_moekd.methods` entry points (once)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for point in entry_points(group=METHODS_GROUP):
            point.load()
    return _METHODS


def card_method(name: str) -> CardMethod:
    check_methods([name])
    return _METHODS[name]


def check_methods(methods: Sequence[str]) -> None:
    known = _METHODS if all(m in _METHODS for m in methods) else card_methods()
    unknown = [m for m in methods if m not in known]
    if unknown or not methods:
        raise ValueError(f"unknown or missing method {unknown or list(methods)}: choose from {', '.join(known)}")
