"""DuckDB SQL for language statistics and stage mixtures, shipped as package data (mmbert_dagster.sql)."""
