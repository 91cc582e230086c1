"""Shared glue for the asset modules: the recipe the code location was loaded with, and code versions."""

from __future__ import annotations

import hashlib
import importlib.util
from types import ModuleType

from mmbert_dagster.recipe import load_recipe
from mmbert_dagster.resources import preset_from_env

# Code versions are computed when the code location loads, from the recipe selected by MMBERT_PRESET; the UI
# marks an asset stale when its recipe section, its SQL or the library code it calls changes.
RECIPE = load_recipe(preset_from_env())


def _source_file(module: ModuleType | str) -> str:
    # By name, a module's file is found without importing it (torch and transformers take seconds to import,
    # and every Dagster step process loads this code location).
    return module.__file__ if isinstance(module, ModuleType) else importlib.util.find_spec(module).origin


def code_version(*sections: str, modules: tuple[ModuleType | str, ...] = (), extra: str = "") -> str:
    sources = "".join(hashlib.sha256(open(_source_file(m), "rb").read()).hexdigest() for m in modules)
    return RECIPE.section_hash(*sections, extra=extra + sources)
