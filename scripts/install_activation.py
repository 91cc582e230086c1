"""Make the bare `dagster asset materialize --select ...` work from the repository root.

`dagster asset materialize` reads neither pyproject.toml nor workspace.yaml, but takes every option from
DAGSTER_CLI_* environment variables. This script
1. appends scripts/activate.sh to the venv's `bin/activate` (MMBERT_HOME, DAGSTER_HOME, the CLI module name), and
2. writes a `.pth` start-up hook into the venv so `.venv/bin/dagster` finds the module even without activation.
Idempotent: running it twice changes nothing.
"""

import sys
import sysconfig
from pathlib import Path

MARK = "# >>> mmbert-dagster >>>"
END = "# <<< mmbert-dagster <<<"


def main(venv: str) -> None:
    repo = Path(__file__).resolve().parent.parent
    activate = Path(venv) / "bin" / "activate"
    text = activate.read_text()
    if MARK in text:
        text = text[: text.index(MARK)] + text[text.index(END) + len(END) + 1 :]
    block = (repo / "scripts" / "activate.sh").read_text()
    activate.write_text(f"{text}{MARK}\nexport MMBERT_REPO=\"{repo}\"\n{block}{END}\n")
    site = Path(sysconfig.get_paths(vars={"base": venv, "platbase": venv})["purelib"])
    (site / "mmbert_dagster_cli.pth").write_text(
        "import os; os.environ.setdefault('DAGSTER_CLI_ASSET_MATERIALIZE_MODULE_NAME', 'mmbert_dagster.definitions'); "
        "os.environ.setdefault('DAGSTER_CLI_ASSET_LIST_MODULE_NAME', 'mmbert_dagster.definitions')\n"
    )
    print(f"environment hooks installed in {activate} and {site / 'mmbert_dagster_cli.pth'}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".venv")
