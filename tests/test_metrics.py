"""`buildfarm run --metrics ADDRESS:PORT`: Prometheus metrics, scraped while the coordinator
runs builds on the test bed, and the metric set against its declaration (metrics.METRICS)."""

from __future__ import annotations

import asyncio
import re
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from farm import Background, Farm, chain, gated_build, token, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_remote import _LongestBackoff
from testbed import Host, Testbed, instantiate, inventory_yaml, nix_expr_trivial

from buildfarm.config import Settings
from buildfarm.coordinator import metrics
from buildfarm.coordinator.fleet import MachineSlots
from buildfarm.coordinator.live import LineReporter
from buildfarm.coordinator.options import RunOptions
from buildfarm.coordinator.service import Coordinator
from buildfarm.errors import UsageError
from buildfarm.inventory import Inventory, Machine
from buildfarm.ssh.remote import Remote

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def families(text: str) -> set[str]:
    return {f"{f.name}_total" if f.type == "counter" else f.name
            for f in text_string_to_metric_families(text)}


# --- without the test bed -------------------------------------------------------------------


def test_the_metrics_are_the_declared_ones(tmp_path: Path) -> None:
    settings = Settings.resolve(state_dir=str(tmp_path), hooks_dir=str(tmp_path / "hooks"))
    machine = Machine(name="m1", host="h", max_builds=3, overload_threshold=0.5)
    coordinator = Coordinator(settings, Inventory("x", (machine,)), RunOptions(), LineReporter())
    remote = Remote(machine, backoff_base=600.0, rng=_LongestBackoff())
    slots = MachineSlots(machine, remote, ready=True, load=0.25)
    coordinator.machines["m1"] = slots
    coordinator.queue_depth = {"x86_64-linux": 4}
    sink = metrics.Metrics("127.0.0.1", 0)
    sink.coordinator = coordinator
    sink.build_counts = {"queued": 4, "succeeded": 2}
    sink.attempt_ended("m1", "success", None, 12.5, 4096)
    sink.attempt_ended("m1", "setup-failure", "missing-inputs", 0.5, 0)
    coordinator.tally.add_events([(1, "build-started", 1.0), (2, "build-success", 2.0),
                                  (3, "build-failure", 3.0), (4, "build-failure", 3.0)])
    sink.pushed("m1", "inputs", 1000)
    sink.pushed("m1", "inputs", 24)
    sink.retries.inc()
    sink.flaky.inc()
    text = sink.exposition().decode()
    assert families(text) == {spec.name for spec in metrics.METRICS}
    for spec in metrics.METRICS:
        assert f"# HELP {spec.name.removesuffix('_total')}" in text
    samples = parse(text)
    assert value(samples, "buildfarm_builds", state="queued") == 4
    assert value(samples, "buildfarm_builds", state="canceled") == 0
    assert value(samples, "buildfarm_queue_depth", system="x86_64-linux") == 4
    assert value(samples, "buildfarm_attempts_total", machine="m1", result="success") == 1
    assert value(samples, "buildfarm_setup_failures_total", machine="m1",
                 kind="missing-inputs") == 1
    assert value(samples, "buildfarm_attempt_duration_seconds_count", result="success") == 1
    assert value(samples, "buildfarm_attempt_duration_seconds_bucket", result="success",
                 le="15.0") == 1
    assert value(samples, "buildfarm_builds_ended_total", state="succeeded") == 1
    assert value(samples, "buildfarm_builds_ended_total", state="failed") == 2
    assert value(samples, "buildfarm_builds_ended_total", state="canceled") == 0
    assert value(samples, "buildfarm_fetched_bytes_total", machine="m1") == 4096
    assert value(samples, "buildfarm_build_retries_total") == 1
    assert value(samples, "buildfarm_flaky_builds_total") == 1
    assert value(samples, "buildfarm_pushed_bytes_total", machine="m1", kind="inputs") == 1024
    assert value(samples, "buildfarm_machine_up", machine="m1") == 1
    assert value(samples, "buildfarm_machine_slots", machine="m1") == 3
    assert value(samples, "buildfarm_machine_load", machine="m1") == 0.25
    assert value(samples, "buildfarm_machine_backoff_seconds", machine="m1") == 0
    remote.note_failure("refused")
    slots.ready = False
    until = remote.backed_off_until
    assert until is not None
    before = time.time()
    samples = parse(sink.exposition().decode())
    after = time.time()
    assert value(samples, "buildfarm_machine_up", machine="m1") == 0
    assert value(samples, "buildfarm_machine_failures", machine="m1") == 1
    # The time left of the back-off (600 s, drawn at its longest), as of the scrape.
    assert until - after <= value(samples, "buildfarm_machine_backoff_seconds",
                                  machine="m1") <= until - before


def test_the_server_serves_and_stops(tmp_path: Path) -> None:
    settings = Settings.resolve(state_dir=str(tmp_path), hooks_dir=str(tmp_path / "hooks"))
    coordinator = Coordinator(settings, Inventory("x", ()), RunOptions(), LineReporter())

    async def serve() -> tuple[str, str, str]:
        sink = metrics.Metrics("127.0.0.1", 0)
        sink.build_counts = {"failed": 3}
        sink._counted = float("inf")  # no datastore here: keep these counts
        url = await sink.start(coordinator)
        try:
            def get(address: str) -> str:
                with urllib.request.urlopen(address, timeout=30) as response:
                    return str(response.read().decode())

            page = await asyncio.to_thread(get, url)
            index = await asyncio.to_thread(get, url.removesuffix("metrics"))
        finally:
            await sink.stop()
        return url, page, index

    url, page, index = asyncio.run(serve())
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
    assert value(parse(page), "buildfarm_builds", state="failed") == 3
    assert "/metrics" in index


def test_bad_addresses_are_refused() -> None:
    assert metrics.parse_address("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert metrics.parse_address(":0") == ("0.0.0.0", 0)
    assert metrics.parse_address("[::1]:9100") == ("::1", 9100)
    for text in ("9100", "host:", "h:99999", "h:x"):
        with pytest.raises(UsageError, match=r"--metrics .*expected ADDRESS:PORT"):
            metrics.parse_address(text)


# --- scraped during a run on the test bed ---------------------------------------------------


@pytest.fixture
def farm(tmp_path: Path, testbed: Testbed, private_nix: Path) -> Farm:
    hooks = tmp_path / "hooks" / "build-success.d"
    hooks.mkdir(parents=True)
    for name, status in (("10-ok", 0), ("20-fails", 3)):
        script = hooks / name
        script.write_text(f"#!/bin/sh\nexit {status}\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return Farm(tmp_path / "state", tmp_path / "inventory.yaml", tmp_path / "hooks")


def metrics_url(coordinator: Background) -> str:
    coordinator.wait_line("metrics at http://")
    found = re.search(r"metrics at (http://\S+)", coordinator.output)
    assert found is not None
    return found[1]


def test_metrics_are_scraped_during_a_run(farm: Farm, hosts: list[Host]) -> None:
    tag = token()
    up, other = hosts
    # A leaf built on the other machine first: the output store holds it, `up` lacks it.
    pushed_leaf, pushed_top = chain(2, f"pushed-{tag}")
    farm.write_inventory([other])
    farm.submit(pushed_leaf)
    assert farm.run().returncode == 0
    dead = {"name": "dead", "host": "127.0.0.1", "port": 1, "user": up.user,
            "systems": ["x86_64-linux"], "known_hosts": str(up.known_hosts)}
    machines = yaml.safe_load(inventory_yaml([up], "nix", max_builds=2))["machines"]
    farm.inventory.write_text(yaml.safe_dump({"machines": [*machines, dead]}))
    gate = farm.state.parent / "never"  # the slow build runs until it is canceled
    slow = gated_build(f"slow-{tag}", gate)
    quick = [instantiate(nix_expr_trivial(f"quick{n}-{tag}", f"echo {n} {tag} > $out"))
             for n in range(3)]
    _leaf, top = chain(2, tag)  # only the top: a missing-inputs setup failure (no hook)
    # A build for a system no machine has stays queued.
    foreign = instantiate(nix_expr_trivial(f"foreign-{tag}", "exit 1").replace(
        "builtins.currentSystem", '"riscv64-linux"'))
    (slow_build,) = farm.submit(slow)
    farm.submit(foreign)
    coordinator = farm.background("--metrics", "127.0.0.1:0")
    try:
        url = metrics_url(coordinator)
        wait_for("the queue depth by system", lambda: value(
            scrape(url), "buildfarm_queue_depth", system="riscv64-linux") == 1)
        wait_for("the slow build to run", lambda: value(
            scrape(url), "buildfarm_machine_slots_used", machine=up.name) == 1)
        during = scrape(url)
        assert value(during, "buildfarm_machine_up", machine=up.name) == 1
        assert value(during, "buildfarm_machine_slots", machine=up.name) == 2
        farm.submit(*quick, top, pushed_top)

        def finished() -> bool:
            samples = scrape(url)
            return (value(samples, "buildfarm_attempts_total", machine=up.name,
                          result="success") >= 4
                    and value(samples, "buildfarm_builds", state="succeeded") >= 5
                    and value(samples, "buildfarm_builds_ended_total", state="succeeded") >= 4
                    and value(samples, "buildfarm_setup_failures_total", machine=up.name,
                              kind="missing-inputs") >= 1
                    and value(samples, "buildfarm_hook_failures_total") >= 3)

        wait_for("the quick builds to complete", finished)
        done = scrape(url)
        # Builds and attempts apart: four builds succeeded in this run (pushed_leaf's was
        # the run before), one attempt each; top took attempts and has not ended.
        assert value(done, "buildfarm_builds_ended_total", state="succeeded") == 4
        assert value(done, "buildfarm_attempts_total", machine=up.name, result="success") == 4
        assert value(done, "buildfarm_builds_ended_total", state="failed") == 0
        # The slow build runs; top waits for its retry, or is being tried again.
        assert value(done, "buildfarm_builds", state="running") >= 1
        assert sum(value(done, "buildfarm_builds", state=s) for s in ("queued", "running")) >= 2
        assert value(done, "buildfarm_attempt_duration_seconds_count", result="success") >= 3
        assert value(done, "buildfarm_fetched_bytes_total", machine=up.name) > 0
        # pushed_top's derivation and its leaf's output went to `up` (the leaf's .drv too).
        assert value(done, "buildfarm_pushed_bytes_total", machine=up.name, kind="inputs") > 0
        assert value(done, "buildfarm_pushed_bytes_total", machine=up.name,
                     kind="derivations") > 0
        assert value(done, "buildfarm_pushed_bytes_total", machine=up.name, kind="sources") == 0
        assert value(done, "buildfarm_queue_depth", system="riscv64-linux") == 1
        assert value(done, "buildfarm_hook_runs_total") >= 6  # two scripts per success
        assert value(done, "buildfarm_machine_up", machine="dead") == 0
        assert value(done, "buildfarm_machine_failures", machine="dead") >= 1
        farm.cli("builds", "cancel", slow_build)
        wait_for("the canceled build's attempt", lambda: value(
            scrape(url), "buildfarm_attempts_total", machine=up.name,
            result="interrupted") == 1)
        wait_for("the canceled build counted", lambda: value(
            scrape(url), "buildfarm_builds_ended_total", state="canceled") == 1)
    finally:
        output = coordinator.stop()
    assert coordinator.process.returncode == 0, output


@pytest.fixture
def two_fresh_hosts(testbed: Testbed) -> Iterator[tuple[Host, Host]]:
    """Two hosts of their own: the load each reports is set by the test."""
    made = (testbed.add_host(f"load-a-{token()}"), testbed.add_host(f"load-b-{token()}"))
    try:
        yield made
    finally:
        for host in made:
            testbed.remove_host(host)


def test_every_machine_load_is_read_again_and_chooses_the_machine(
    farm: Farm, two_fresh_hosts: tuple[Host, Host]
) -> None:
    """Without overload_threshold, each connected machine's load is read again every
    --load-interval seconds on its connection: the metric follows it, and of two idle
    machines the build goes to the less loaded one (lowest load ÷ speed)."""
    first, second = two_fresh_hosts
    tag = token()
    first.set_load(0.0)
    second.set_load(40.0)
    farm.write_inventory([first, second], max_builds=1)
    coordinator = farm.background("--metrics", "127.0.0.1:0", "--load-interval", "1")
    try:
        url = metrics_url(coordinator)

        def loads(wanted: tuple[float, float]) -> bool:
            samples = scrape(url)
            return tuple(value(samples, "buildfarm_machine_load", machine=h.name)
                         for h in (first, second)) == wanted

        wait_for("both loads read", lambda: loads((0.0, 40.0)))
        (build,) = farm.submit(instantiate(nix_expr_trivial(f"calm-{tag}", "echo 1 > $out")))
        farm.wait_for_state(build, "succeeded")
        assert farm.show(build)["attempts"][0]["machine"] == first.name
        first.set_load(40.0)
        second.set_load(0.5)
        wait_for("the loads read again", lambda: loads((40.0, 0.5)), timeout=60)
        (build,) = farm.submit(instantiate(nix_expr_trivial(f"busy-{tag}", "echo 2 > $out")))
        farm.wait_for_state(build, "succeeded")
        assert farm.show(build)["attempts"][0]["machine"] == second.name
    finally:
        output = coordinator.stop()
    assert coordinator.process.returncode == 0, output
