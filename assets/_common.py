"""Shared glue for the asset modules: the process's recipe (the one source of the stage graph) and code versions."""

from __future__ import annotations

import hashlib
import importlib.util
from types import ModuleType

import polars as pl
from dagster import MetadataValue, TableColumn, TableRecord, TableSchema

from mmbert_dagster.recipe import active_recipe

# The recipe selected by MMBERT_PRESET, loaded once per process: the asset graph is built from it, and the
# artifact store places artifacts under its name. Code versions are computed from it when the code location
# loads, so the UI marks an asset stale when its recipe section, its SQL or the library code it calls changes.
RECIPE = active_recipe()


def _source_file(module: ModuleType | str) -> str:
    # By name, a module's file is found without importing it (torch and transformers take seconds to import,
    # and every Dagster step process loads this code location).
    return module.__file__ if isinstance(module, ModuleType) else importlib.util.find_spec(module).origin


def code_version(*sections: str, modules: tuple[ModuleType | str, ...] = (), extra: str = "") -> str:
    sources = "".join(hashlib.sha256(open(_source_file(m), "rb").read()).hexdigest() for m in modules)
    return RECIPE.section_hash(*sections, extra=extra + sources)


def _column_type(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    return "bool" if dtype == pl.Boolean else "string"


def _cell(value):
    if isinstance(value, float):
        return round(value, 6)
    return value if value is None or isinstance(value, (int, bool, str)) else str(value)


def table_metadata(df: pl.DataFrame, max_rows: int = 40):
    """A polars frame as a Dagster table (sortable in the UI); the first ``max_rows`` rows."""
    shown = df.head(max_rows)
    schema = TableSchema(columns=[TableColumn(name=c, type=_column_type(t)) for c, t in shown.schema.items()])
    records = [TableRecord(data={k: _cell(v) for k, v in row.items()}) for row in shown.iter_rows(named=True)]
    return MetadataValue.table(records=records, schema=schema)
