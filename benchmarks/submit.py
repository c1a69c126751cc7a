"""How fast the derivation reader and `buildfarm submit` are (issue: 10,000 in under 10 s).

Run: .venv/bin/python benchmarks/submit.py [COUNT]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from graphs import generate

from buildfarm import derivation


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp) / "drvs", count)
        started = time.perf_counter()
        for file in files:
            derivation.read(file)
        parse = time.perf_counter() - started
        env = {**os.environ, "BUILDFARM_STATE_DIR": str(Path(tmp) / "state")}
        env.pop("BUILDFARM_DB", None)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "buildfarm", "submit", "-"],
            input="\n".join(files), env=env, capture_output=True, text=True, check=True,
        )
        submit = time.perf_counter() - started
        assert len(done.stdout.split()) == count
    print(f"derivations            {count}")
    print(f"read + parse           {parse:.2f} s  ({count / parse:,.0f} drv/s)")
    print(f"buildfarm submit -     {submit:.2f} s  ({count / submit:,.0f} drv/s; target < 10 s "
          "for 10,000)")


if __name__ == "__main__":
    main()
