"""The one Definitions object: it only gathers what the asset modules define."""

from dagster import Definitions, load_asset_checks_from_modules, load_assets_from_modules

from mmbert_dagster.assets import data, evaluation, mixtures, tokens, training
from mmbert_dagster.resources import default_resources

_modules = [data, mixtures, tokens, training, evaluation]

defs = Definitions(
    assets=load_assets_from_modules(_modules),
    asset_checks=load_asset_checks_from_modules(_modules),
    jobs=[evaluation.nightly_eval_job],
    schedules=[evaluation.nightly_eval],
    resources=default_resources(),
)
