# mmbert-dagster environment (appended to .venv/bin/activate by `make env`).
# `dagster asset materialize` does not read pyproject.toml or workspace.yaml; the dagster CLI takes any option
# from DAGSTER_CLI_<COMMAND>_<OPTION>, so these make the bare `dagster asset materialize --select ...` work.
export DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME=mmbert_dagster.definitions
export DAGSTER_CLI_ASSET_LIST_MODULE_NAME=mmbert_dagster.definitions
export MMBERT_HOME="${MMBERT_HOME:-$MMBERT_REPO/.mmbert}"
export DAGSTER_HOME="${DAGSTER_HOME:-$MMBERT_HOME/dagster}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || cp "$MMBERT_REPO/scripts/dagster.yaml" "$DAGSTER_HOME/dagster.yaml"
