"""The demo behind scripts/demo: one loopback build machine, a three-level chain, one submit of
its top with --closure (which queues the two levels below it too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from testbed import Testbed, instantiate, nix_expr_trivial  # noqa: E402


def main() -> int:
    state = ROOT / "demo-state"
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir()
    leaf = nix_expr_trivial("demo-leaf", "echo 'hello from the leaf' > $out")
    middle = nix_expr_trivial(
        "demo-middle", "read x < $leaf; echo \"middle, on top of: $x\" > $out", attrs={"leaf": leaf}
    )
    top = nix_expr_trivial(
        "demo-top", "read x < $middle; echo \"top, on top of: $x\" > $out", attrs={"middle": middle}
    )
    drv = instantiate(top)
    env = {
        **os.environ,
        "BUILDFARM_STATE_DIR": str(state),
        "BUILDFARM_INVENTORY": str(state / "inventory.yaml"),
        "BUILDFARM_HOOKS_DIR": str(ROOT / "hooks.d"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    def buildfarm(*args: str) -> str:
        print(f"$ buildfarm {' '.join(args)}", flush=True)
        done = subprocess.run(["buildfarm", *args], env=env, text=True, stdout=subprocess.PIPE)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            raise SystemExit(done.returncode)
        return done.stdout

    with Testbed() as bed:
        host = bed.add_host("demo-machine")
        bed.write_inventory(state / "inventory.yaml", [host], max_builds=2)
        print(f"build machine: sshd on 127.0.0.1:{host.port} with its own Nix store")
        (uuid,) = buildfarm("submit", "--closure", drv).split()
        buildfarm("run", "--exit-when-idle", "--no-ui")
        buildfarm("builds", "list")
        buildfarm("log", uuid)
        info = buildfarm("builds", "show", uuid)
    return 0 if "succeeded" in info else 1


if __name__ == "__main__":
    sys.exit(main())
