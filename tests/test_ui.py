"""The Dagster UI in a real browser: `dagster dev` on the embedded default, driven by headless Chromium (Debian's
`chromium` package through Playwright). Screenshots go to ``$MMBERT_TEST_ARTIFACTS/ui`` (default
``test-artifacts/ui`` in the repository).

`make test` installs Chromium when it is missing and it can (root + apt); without it this test is skipped —
except under CI (``CI=true``), where a missing browser is a failure."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from graph_helpers import DAGSTER, REPO
from model_helpers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extra installs it
    sync_playwright = None
MISSING = None if CHROMIUM and sync_playwright else "needs Debian's chromium and the playwright package"
if MISSING and os.environ.get("CI") == "true":
    raise RuntimeError(f"tests/test_ui.py {MISSING}; `make test` installs both (apt-get install chromium)")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

ALL_KEYS = {
    "raw_corpus", "filtered_corpus", "language_id_model", "language_id_table", "language_stats", "tokenizer",
    *(f"{kind}_{s}" for kind in ("mixture", "shards") for s in ("pretrain", "midtrain", "decay_eng", "decay_cont",
                                                               "decay_all")),
    "pretrain_checkpoint", "midtrain_checkpoint", "decay_eng", "decay_cont", "decay_all", "merged_model",
    "benchmark_scores",
}


def _shots() -> Path:
    folder = Path(os.environ.get("MMBERT_TEST_ARTIFACTS", REPO / "test-artifacts")) / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`dagster dev` (webserver + daemon) on a fresh artifact root and instance, bound to 127.0.0.1."""
    home = tmp_path_factory.mktemp("ui_home")
    (home / "dagster").mkdir()
    shutil.copy(REPO / "scripts" / "dagster.yaml", home / "dagster" / "dagster.yaml")
    env = {**os.environ, "MMBERT_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "HF_HUB_OFFLINE": "1"}
    env.pop("MMBERT_PRESET", None)
    port = free_port()
    log = open(home / "dagster_dev.log", "w")
    proc = subprocess.Popen([DAGSTER, "dev", "-h", "127.0.0.1", "-p", str(port),
                             "-m", "mmbert_dagster.definitions"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"{url}/server_info", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                log.close()
                pytest.fail(f"dagster dev did not come up:\n{(home / 'dagster_dev.log').read_text()[-3000:]}")
            time.sleep(1)
    yield {"url": url, "home": home}
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def page(ui):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # tall enough for the whole expanded asset graph (nodes outside the viewport are not rendered)
        pg = browser.new_page(viewport={"width": 2000, "height": 2600})
        pg.set_default_timeout(60_000)
        # the first-visit "Join the community" dialog can open at any moment (late on a busy machine) and then
        # blocks every click: Playwright dismisses it whenever it shows, before each action and retry
        pg.add_locator_handler(pg.get_by_role("button", name="Skip"), lambda skip: skip.click())
        yield pg
        browser.close()


def _shown_as(key: str, label: str) -> bool:
    """The graph middle-truncates long names ("midtra…_checkpoint")."""
    if "…" not in label:
        return label == key
    head, tail = label.split("…", 1)
    return key.startswith(head) and key.endswith(tail) and len(key) > len(head) + len(tail)


def test_the_asset_graph_shows_every_asset(ui, page):
    page.goto(f"{ui['url']}/asset-groups", wait_until="networkidle")
    page.get_by_role("button", name="settings", exact=True).click()
    page.get_by_role("menuitem", name="Expand all groups").click()
    page.keyboard.press("Escape")
    names = page.locator("svg foreignObject [class*=assetName]")
    expect(names.first).to_be_visible()
    page.wait_for_function("n => document.querySelectorAll('svg foreignObject [class*=assetName]').length >= n",
                           arg=len(ALL_KEYS))
    labels = names.all_text_contents()
    missing = [k for k in sorted(ALL_KEYS) if not any(_shown_as(k, label) for label in labels)]
    page.screenshot(path=str(_shots() / "asset_graph.png"))
    assert not missing, f"not in the asset graph: {missing} (labels: {labels})"


def test_materialize_from_the_ui_succeeds_with_progress_in_the_run_log(ui, page):
    page.goto(f"{ui['url']}/assets/raw_corpus", wait_until="networkidle")
    page.get_by_role("button", name="Materialize").first.click()
    launched = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
    expect(launched).to_be_visible()
    page.get_by_role("link", name="View").first.click()
    expect(page).to_have_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    # the asset's own progress lines stream into the run's log
    expect(page.get_by_text(re.compile(r"raw_corpus: \d+ documents, [\d.]+ MB written")).first).to_be_visible(
        timeout=180_000)
    expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible(timeout=180_000)
    page.screenshot(path=str(_shots() / "run.png"))
    assert (ui["home"] / "tiny" / "raw_corpus" / "MANIFEST.json").is_file()


def test_an_asset_plot_opens_from_its_metadata(ui, page):
    if not (ui["home"] / "tiny" / "raw_corpus" / "MANIFEST.json").is_file():
        pytest.skip("needs the materialization of the previous test")
    page.goto(f"{ui['url']}/assets/raw_corpus", wait_until="networkidle")
    row = page.get_by_role("row").filter(has_text="bytes_per_language")
    row.get_by_text("Show Markdown").click()
    dialog = page.get_by_role("dialog")
    plot = dialog.locator("img[src^='data:image/png']")
    expect(plot).to_be_visible()
    box = plot.bounding_box()
    assert box["width"] > 300 and box["height"] > 150
    dialog.screenshot(path=str(_shots() / "metadata_plot.png"))
    page.screenshot(path=str(_shots() / "asset_page.png"))
