"""Print each installed distribution whose version is not the one requirements.lock pins.

`scripts/setup --latest` runs it in .venv-latest, so that a passing `scripts/test --latest` says
which upgrades it tried: adopting them is a regenerated, committed lock.
Usage: PYTHON scripts/unlocked.py requirements.lock
"""

import re
import sys
from importlib.metadata import distributions
from pathlib import Path


def normalized(name: str) -> str:
    """The name as PEP 503 compares it (the lock writes names this way)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock: Path) -> None:
    pins = re.findall(r"^([\w.-]+)==([^\s;]+)", lock.read_text(encoding="utf-8"), re.MULTILINE)
    locked = {normalized(name): version for name, version in pins}
    installed = {normalized(d.metadata["Name"]): d.version for d in distributions()}
    differences = 0
    for name, version in sorted(installed.items()):
        if name not in ("buildfarm", "pip") and locked.get(name) != version:
            print(f"  {name} {locked.get(name, '(not locked)')} -> {version}")
            differences += 1
    if differences == 0:
        print("  nothing: every version is the one the lock pins")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
