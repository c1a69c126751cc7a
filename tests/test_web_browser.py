"""`buildfarm web` during a real run on the test bed: its event stream, and its pages in a real
browser, Debian's Chromium, driven by playwright-core from tests/browser/scenarios.js (installed
with npm from its lock file; no browser is ever downloaded).

A client of /events that disconnects halfway through a run and reconnects with Last-Event-ID
gets every event of the run, in order, once. While `buildfarm run` builds on the test bed's
machines, the overview shows a build go from running to succeeded without a reload, a running
build's page shows its log grow, and the derivation name filter narrows the builds list. The
same run takes the README's screenshots: BUILDFARM_SCREENSHOTS=1 copies them to docs/."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import needs
import pytest
from farm import Farm, chain, token, wait_for
from test_web import EventStream, WebServer, assert_safe
from testbed import Host, Testbed, instantiate, nix_expr_trivial

BROWSER_DIR = Path(__file__).parent / "browser"
DOCS = Path(__file__).parent.parent / "docs"
CHROMIUM = "/usr/bin/chromium"
NODE_TIMEOUT = 240


@pytest.fixture(scope="module")
def playwright() -> Path:
    """tests/browser/node_modules with playwright-core, installed from the lock file once."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        needs.unavailable("node and npm", "apt-get install nodejs npm")
    if not os.access(CHROMIUM, os.X_OK):
        needs.unavailable(f"Debian's Chromium at {CHROMIUM}", "apt-get install chromium")
    lock = json.loads((BROWSER_DIR / "package-lock.json").read_text())
    wanted = lock["packages"]["node_modules/playwright-core"]["version"]
    installed = BROWSER_DIR / "node_modules" / "playwright-core" / "package.json"
    if not installed.exists() or json.loads(installed.read_text())["version"] != wanted:
        env = {**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"}
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=BROWSER_DIR, env=env, capture_output=True, text=True, timeout=300, check=False,
        )
        if done.returncode != 0:
            needs.unavailable(f"playwright-core from npm ({done.stderr.strip()[-500:]})")
    return BROWSER_DIR


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Iterator[Farm]:
    yield Farm(tmp_path / "state", tmp_path / "inventory.yaml")


def ticking(name: str, until: str, attrs: dict[str, str] | None = None) -> str:
    """The expression of a build that prints a line (and a bell) every 0.3 s until `until`
    holds (a shell test), then succeeds."""
    script = (
        f'i=0; until {until}; do printf "%s\\a\\n" "{name} tick $i of many"; '
        f"/bin/sleep 0.3; i=$((i+1)); done; echo done > $out"
    )
    return nix_expr_trivial(name, script, attrs=attrs)


def scenarios(config: dict[str, Any], work: Path, gate: Path) -> dict[str, Any]:
    """Run tests/browser/scenarios.js; open `gate` once its pages have seen their first state."""
    path = work / "browser.json"
    ready = work / "pages-ready"
    path.write_text(json.dumps({**config, "ready": str(ready)}))
    node = subprocess.Popen(
        ["node", str(BROWSER_DIR / "scenarios.js"), str(path)],
        cwd=BROWSER_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for("the pages to see the builds", lambda: ready.exists() or node.poll() is not None,
                 timeout=NODE_TIMEOUT)
    finally:
        gate.touch()
        out, err = node.communicate(timeout=NODE_TIMEOUT)
    assert node.returncode == 0, err
    results: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return results


def test_live_pages_in_chromium_during_a_run(
    playwright: Path, farm: Farm, hosts: list[Host], testbed: Testbed, tmp_path: Path
) -> None:
    tag = token()
    farm.write_inventory(hosts, max_builds=2)
    listed = [instantiate(nix_expr_trivial(f"filterme-{tag}-{n}", f"echo {n} > $out"))
              for n in range(3)]
    failing = instantiate(nix_expr_trivial(f"broken-{tag}", "echo oops; exit 1"))
    quick = farm.submit(*listed, failing, extra=("--tag", f"suite={tag}"))
    gate = testbed.directory / f"gate-{tag}"
    run = farm.background()
    web = WebServer(farm.env)
    try:
        for build in quick:
            wait_for(f"build {build} ended",
                     lambda b=build: farm.state_of(b) in ("succeeded", "failed"))
        # The overview and log builds run until Chromium has seen them run (and the late
        # build, which needs the overview build's output, wait in the queue).
        overview_expr = ticking(f"overview-{tag}", f"[ -e {gate} ]")
        (overview_build,) = farm.submit(instantiate(overview_expr))
        (log_build,) = farm.submit(instantiate(ticking(f"logtail-{tag}", f"[ -e {gate} ]")))
        (late_build,) = farm.submit(instantiate(ticking(
            f"late-{tag}", "[ $i -ge 4 ]", attrs={"dep": overview_expr})))
        farm.wait_for_state(overview_build, "running")
        farm.wait_for_state(log_build, "running")
        wait_for("the log's first lines",
                 lambda: "tick 1 of" in web.get(f"/builds/{log_build}/log")[2])
        shots = tmp_path / "shots"
        shots.mkdir()
        assert farm.state_of(late_build) == "queued"
        results = scenarios({
            "url": web.url, "overviewBuild": overview_build, "logBuild": log_build,
            "lateBuild": late_build,
            "filterName": f"filterme-{tag}", "screenshots": str(shots), "chromium": CHROMIUM,
        }, tmp_path, gate)
        farm.wait_for_state(log_build, "succeeded")
        farm.wait_for_state(late_build, "succeeded")
        # The failed build's page: the builder's exit status beside Nix's message naming it
        # (nix-store's own is 100 for any failed build).
        text = " ".join(assert_safe(web.get(f"/builds/{quick[-1]}")[2]).text)
        assert "builder for" in text and "failed with exit code 1" in text
        assert re.search(r"Exit status\s*1\b", text), text
    finally:
        gate.touch()
        web.stop()
        run.stop()

    seen = results["overview"]
    assert seen["wasRunning"] and seen["succeeded"] and not seen["stillListedRunning"]
    assert seen["sameDocument"] and seen["navigations"] == 1, seen
    log = results["log"]
    assert log["streaming"] == f"/builds/{log_build}/log/stream"
    assert log["after"] > log["before"] > 0 and log["sameDocument"], log
    assert not log["controls"], log  # the bells are in the log, not on the page
    assert log["navigations"] == 1, log
    late = results["late"]
    assert late["queuedAtFirst"] and late["sameDocument"] and late["navigations"] == 1, late
    narrowed = results["filter"]
    assert narrowed["before"] >= 6 and narrowed["after"] == 3, narrowed
    assert sorted(narrowed["names"]) == [f"filterme-{tag}-{n}" for n in range(3)]
    assert f"name=filterme-{tag}" in narrowed["url"]
    for name in ("overview.png", "build.png"):
        assert (shots / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        if os.environ.get("BUILDFARM_SCREENSHOTS") == "1":
            DOCS.mkdir(exist_ok=True)
            shutil.copyfile(shots / name, DOCS / name)


def test_event_stream_of_a_run_survives_a_reconnection_halfway(
    farm: Farm, hosts: list[Host]
) -> None:
    drvs = chain(3, token())
    farm.write_inventory(hosts)
    farm.submit(drvs[0])  # the datastore exists before the server starts
    web = WebServer(farm.env)
    try:
        first = EventStream(web.netloc)  # from now on
        builds = farm.submit(*drvs[1:])
        (leaf,) = [e.payload["build"]["uuid"] for e in farm.events()
                   if e.payload["build"]["derivation"] == drvs[0]]
        top = builds[-1]
        run = farm.background("--exit-when-idle")
        got = [first.next()]
        while not (got[-1][1] == "build-success" and got[-1][2]["build"]["uuid"] == leaf):
            got.append(first.next())
        first.close()  # halfway: the leaf is built, the others are not
        farm.wait_for_state(builds[0], "succeeded")  # events happen while no client listens
        again = EventStream(web.netloc, last_event_id=got[-1][0])
        while not (got[-1][1] == "build-success" and got[-1][2]["build"]["uuid"] == top):
            got.append(again.next())
        again.close()
        # --exit-when-idle: let it exit by itself (a SIGTERM racing its exit would kill it).
        run.process.wait(timeout=120)
        output = run.stop(timeout=120)
        assert run.process.returncode == 0, output
    finally:
        web.stop()
    stored = [(e.id, e.name, e.payload) for e in farm.events()]
    logs = [payload for _, _, payload in stored if payload.get("log")]
    assert logs and all(str(farm.state) in p["log"] for p in logs)  # a file, for the hooks
    for payload in logs:  # the web names the log by its URL instead
        payload["log"] = f"/builds/{payload['build']['uuid']}/log"
    assert got == stored[1:]  # every event after the client first connected, in order, once
    names = [name for _, name, _ in got]
    assert names.count("build-submitted") == 2 and names.count("build-started") == 3
    assert names.count("build-success") == 3
