import os

# Nothing may reach a model/data hub in tests: without this, hub calls hang ~46 s before failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def graph(tmp_path_factory):
    """The whole e2e graph materialized once (tests/graph_helpers.py); shared by the graph, fault and bad-input
    tests, which must not leave its artifacts changed (tests that break artifacts use graph_helpers.copy_home)."""
    from graph_helpers import build_graph

    yield from build_graph(tmp_path_factory)
