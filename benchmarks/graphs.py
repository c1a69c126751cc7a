"""Synthetic derivation graphs shaped like a distribution's package graph.

Per system (several, in realistic shares) a bootstrap chain comes first (every link depends on
the one before: the depth of a real graph), then packages that each take the chain's last links
as implicit inputs (a build system's toolchain) plus a long-tailed number of explicit inputs,
picked among earlier packages with a strong preference for the early, basic ones — so a few
packages are inputs of almost everything, as in Guix or Nixpkgs. A few need machine features
(big-parallel, kvm). Every derivation has well-formed outputs, builder, arguments and an
environment of realistic size, and its store path is computed from its text like Guix does.

`distribution()` returns the parsed derivations (for `record_submission`, the datastore's public
API: how 1,000,000 builds get into a datastore in minutes); `generate()` writes them as .drv
files named like store items, so `buildfarm submit` finds input derivations next to them.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Iterator
from pathlib import Path

from buildfarm.formats import derivation as drvmod
from buildfarm.formats.nar import nix_base32_encode
from buildfarm.submission import ReadDerivation, text_store_path

# (system, share of the derivations): a distribution built for several architectures.
SYSTEMS = (
    ("x86_64-linux", 0.55),
    ("aarch64-linux", 0.25),
    ("i686-linux", 0.12),
    ("powerpc64le-linux", 0.08),
)
BOOTSTRAP = 40  # links of the bootstrap chain per system (depth)
TOOLCHAIN = 4  # last links every later package uses (implicit inputs)
EXPLICIT = (0, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 8, 12, 20)  # explicit inputs, long-tailed


def _store_path(store: str, seed: str, name: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()[:20]
    return f"{store}/{nix_base32_encode(digest)}-{name}"


def _features(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.03:
        return "big-parallel"
    if draw < 0.035:
        return "kvm"
    return ""


def _one(
    rng: random.Random, store: str, seed: int, system: str, index: int,
    inputs: dict[str, tuple[str, ...]],
) -> ReadDerivation:
    name = f"pkg{index}-{system.split('-')[0]}-1.{index % 9}"
    outputs = ["out"] if rng.random() < 0.75 else ["out", rng.choice(("doc", "lib", "debug"))]
    paths = {o: _store_path(store, f"{seed}-{system}-{index}-{o}", name if o == "out"
                            else f"{name}-{o}") for o in outputs}
    env = {
        "name": name,
        "system": system,
        "builder": f"{store}/guile-3.0/bin/guile",
        "outputs": " ".join(sorted(outputs)),
        "source": _store_path(store, f"{seed}-src-{index}", f"{name}.tar.xz"),
        "guix properties": "((type . package))",
        "configureFlags": " ".join(f"--enable-feature-{n}" for n in range(rng.randint(0, 12))),
        **paths,
    }
    features = _features(rng)
    if features:
        env["requiredSystemFeatures"] = features
    drv = drvmod.Derivation(
        outputs=tuple(drvmod.DerivationOutput(o, p, "", "") for o, p in sorted(paths.items())),
        input_drvs=tuple(sorted(inputs.items())),
        input_srcs=(),
        system=system,
        builder=env["builder"],
        args=("--no-auto-compile", "-L", f"{store}/guix-modules", "-c", f'(build "{name}")'),
        env=tuple(sorted(env.items())),
    )
    contents = drvmod.serialize(drv)
    path = text_store_path(store, f"{name}.drv", contents, drv.references)
    return ReadDerivation(path, drv, contents)


def distribution(
    count: int, *, store: str = "/gnu/store", seed: int = 1
) -> Iterator[ReadDerivation]:
    """`count` derivations over SYSTEMS, each after its inputs (topological order)."""
    rng = random.Random(seed)
    per_system = [max(1, round(count * share)) for _, share in SYSTEMS]
    per_system[0] += count - sum(per_system)
    made: dict[str, list[str]] = {system: [] for system, _ in SYSTEMS}
    # Interleave the systems, as an evaluation of several architectures is.
    order = [s for (s, _), n in zip(SYSTEMS, per_system, strict=True) for _ in range(n)]
    rng.shuffle(order)
    for index, system in enumerate(order):
        earlier = made[system]
        inputs: dict[str, tuple[str, ...]] = {}
        if len(earlier) < BOOTSTRAP:
            inputs.update((p, ("out",)) for p in earlier[-2:])
        else:
            inputs.update((p, ("out",)) for p in earlier[BOOTSTRAP - TOOLCHAIN : BOOTSTRAP])
            packages = len(earlier) - BOOTSTRAP
            for _ in range(min(packages, rng.choice(EXPLICIT))):
                # Mostly basic packages (the long tail), sometimes recent ones.
                draw = rng.random() ** 3 if rng.random() < 0.7 else rng.random()
                inputs[earlier[BOOTSTRAP + int(packages * draw)]] = ("out",)
        item = _one(rng, store, seed, system, index, inputs)
        earlier.append(item.path)
        yield item


def generate(directory: Path, count: int, *, store: str = "/gnu/store", seed: int = 1) -> list[str]:
    """Write `count` derivations to `directory`; return their file paths, inputs first."""
    directory.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    for item in distribution(count, store=store, seed=seed):
        file = directory / os.path.basename(item.path)
        file.write_bytes(item.contents)
        files.append(str(file))
    return files
