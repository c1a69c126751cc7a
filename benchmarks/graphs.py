"""Synthetic derivation graphs shaped like a distribution's package graph, written as .drv files.

Each derivation has outputs with well-formed store paths, a few input derivations chosen among
earlier ones (a long-tailed fan-in: a few base packages are inputs of almost everything), a
builder, arguments and an environment of realistic size. Files are named like store items, so
`buildfarm submit` reads the input derivations next to them.
"""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

from buildfarm import derivation as drvmod
from buildfarm.nar import nix_base32_encode
from buildfarm.submission import text_store_path

SYSTEMS = ("x86_64-linux", "aarch64-linux", "i686-linux")


def _store_path(store: str, seed: str, name: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()[:20]
    return f"{store}/{nix_base32_encode(digest)}-{name}"


def generate(directory: Path, count: int, *, store: str = "/gnu/store", seed: int = 1) -> list[str]:
    """Write `count` derivations to `directory`; return their file paths, leaves first."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    made: list[tuple[str, str]] = []  # (store path, "out" path)
    files: list[str] = []
    for i in range(count):
        name = f"pkg{i}-1.{i % 7}"
        system = SYSTEMS[0] if rng.random() < 0.8 else rng.choice(SYSTEMS[1:])
        fan_in = min(len(made), rng.choice((0, 1, 2, 3, 4, 6, 10)))
        chosen: dict[str, tuple[str, ...]] = {}
        for _ in range(fan_in):
            # Long tail: early (base) packages are picked far more often.
            index = int(len(made) * (rng.random() ** 3))
            chosen[made[index][0]] = ("out",)
        out = _store_path(store, f"{seed}-{i}-out", name)
        env = {
            "name": name,
            "out": out,
            "system": system,
            "builder": f"{store}/guile/bin/guile",
            "guix properties": "((type . package))",
            "configureFlags": " ".join(f"--enable-feature-{n}" for n in range(rng.randint(0, 8))),
        }
        drv = drvmod.Derivation(
            outputs=(drvmod.DerivationOutput("out", out, "", ""),),
            input_drvs=tuple(sorted(chosen.items())),
            input_srcs=(),
            system=system,
            builder=env["builder"],
            args=("--no-auto-compile", "-c", f"(build \"{name}\")"),
            env=tuple(sorted(env.items())),
        )
        contents = drvmod.serialize(drv)
        path = text_store_path(store, f"{name}.drv", contents, drv.references)
        file = directory / os.path.basename(path)
        file.write_bytes(contents)
        made.append((path, out))
        files.append(str(file))
    return files
