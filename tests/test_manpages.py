"""The man pages in man/ are generated from the code (buildfarm/docs/manpages.py): they must be
current, render without a warning, cover every command, option and --json shape, and agree
with inventory.example.yaml, which is where the inventory fields are described."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from buildfarm import inventory
from buildfarm.cli import cli
from buildfarm.coordinator import metrics
from buildfarm.docs import command_pages, inventory_page, manpages
from buildfarm.docs.json_schemas import SCHEMAS, describe

MAN = manpages.MAN_DIR


def rendered(page: Path) -> str:
    """The page as man(1) shows it, in one line of words."""
    done = subprocess.run(
        ["man", "--local-file", str(page)], capture_output=True, text=True, check=True,
        env={**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "200"},
    )
    return " ".join(done.stdout.split())


def commands() -> list[tuple[tuple[str, ...], click.Command]]:
    root = click.Context(cli, info_name="buildfarm", **cli.context_settings)
    return [(path, command) for path, command, _ in command_pages.walk(cli, root)]


def test_the_pages_are_current() -> None:
    """Fails when the code and man/ differ: run `python -m buildfarm.docs.manpages`."""
    assert manpages.drift() == [], "run `python -m buildfarm.docs.manpages` and commit man/"
    assert manpages.main(["--check"]) == 0


def test_every_page_is_marked_as_generated() -> None:
    wanted = manpages.all_pages()
    assert set(wanted) == {p.name for p in manpages.generated_files()}
    for text in wanted.values():
        assert text.startswith(manpages.GENERATED_MARK)
        assert "do not edit" in text.splitlines()[1]


def test_drift_is_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "man"
    shutil.copytree(MAN, copy)
    assert manpages.drift(copy) == []
    (copy / "buildfarm-gone.1").write_text(manpages.GENERATED_MARK + " from nothing\n")
    (copy / "buildfarm-log.1").unlink()
    assert sorted(manpages.drift(copy)) == [
        f"{copy}/buildfarm-gone.1 documents nothing any more",
        f"{copy}/buildfarm-log.1 is missing",
    ]
    # A new metric, a changed option: the pages that show them are out of date.
    monkeypatch.setattr(metrics, "METRICS", (
        *metrics.METRICS, metrics.MetricSpec("buildfarm_x", "gauge", (), "X.")))
    run_command = cli.commands["run"]
    option = next(p for p in run_command.params if p.name == "grace")
    monkeypatch.setattr(option, "help", "Changed.")
    assert f"{MAN}/buildfarm-run.1 is out of date" in manpages.drift()


def test_every_command_has_a_page_with_every_option() -> None:
    wanted = manpages.all_pages()
    for path, command in commands():
        name = command_pages.page_name(path) + ".1"
        assert name in wanted, name
        text = wanted[name]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.opts[0].replace("-", "\\-") in text, (name, param.opts)
        if path:
            assert f"\\fB{' '.join(path).replace('-', chr(92) + '-')}\\fR" in text
        assert ".SH EXIT STATUS" in text and ".SH SEE ALSO" in text
    assert {"buildfarm.1", "buildfarm-inventory.5", "buildfarm-hooks.7",
            "buildfarm-machines.1", "buildfarm-machines-test.1"} <= set(wanted)


def test_the_pages_render_cleanly() -> None:
    for page in sorted(MAN.iterdir()):
        text = page.read_text()
        assert text.isascii(), page
        done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)],
                              capture_output=True, text=True)
        assert done.returncode == 0 and done.stderr == "", (page, done.stderr)
    words = rendered(MAN / "buildfarm.1")
    assert words.startswith("BUILDFARM(1)")
    for section in ("NAME", "SYNOPSIS", "COMMANDS", "ENVIRONMENT", "FILES", "SHELL COMPLETION",
                    "EXIT STATUS", "SEE ALSO"):
        assert section in words


def test_json_shapes_are_in_the_pages() -> None:
    for key, schema in SCHEMAS.items():
        words = rendered(MAN / f"buildfarm-{key.replace(' ', '-')}.1")
        assert f"JSON OUTPUT With --json, buildfarm {key} prints" in words, key
        for dotted, kind, _meaning in describe(schema.shape):
            assert f"{dotted} ({kind})" in words, (key, dotted)
    show = rendered(MAN / "buildfarm-builds-show.1")
    assert "attempts[].missing_inputs (list of strings)" in show
    machines = rendered(MAN / "buildfarm-machines.1")
    assert "clock_skew (number or null)" in machines and "backoff_until" in machines


def test_run_documents_metrics_signals_and_reload() -> None:
    words = rendered(MAN / "buildfarm-run.1")
    for spec in metrics.METRICS:
        assert f"{spec.name} ({spec.kind}" in words
    for phrase in ("SIGHUP reloads the inventory", "INVENTORY RELOAD",
                   "inventory not reloaded, keeping the old one:", "--metrics ADDRESS:PORT",
                   "NO_COLOR"):
        assert phrase in words, phrase


def test_machines_test_documents_its_checks_and_exit_status() -> None:
    from buildfarm.machines.checks import CHECKS

    words = rendered(MAN / "buildfarm-machines-test.1")
    for name in CHECKS:
        assert f" {name} " in words
    assert "A machine failed a check" in words
    assert "guix archive --import" in words


def test_the_inventory_page_describes_every_field_from_the_example() -> None:
    example = inventory_page.read_example(manpages.INVENTORY_EXAMPLE)
    names = [f.name for f in dataclasses.fields(inventory.Machine)]
    assert list(example.fields) == names
    words = rendered(MAN / "buildfarm-inventory.5")
    for name in names:
        assert f"{name} ({inventory_page.field_type(name)})" in words
    assert "port (integer, 1 to 65535) SSH port" in words
    assert "store (guix or nix)" in words
    assert "- name: x86-a" in words  # the example itself


def test_the_example_states_the_defaults_of_the_code() -> None:
    """inventory.example.yaml says "Default: X" for each field; X must be the code's."""
    example = inventory_page.read_example(manpages.INVENTORY_EXAMPLE)
    for field in dataclasses.fields(inventory.Machine):
        description = example.fields[field.name]
        if field.default is dataclasses.MISSING or field.name == "systems":
            continue  # required, or the coordinator's own system
        stated = description.split("Default: ", 1)[1]
        value = field.default
        if value is None:
            spelled = ["none"]
        elif isinstance(value, bool):
            spelled = [str(value).lower()]
        elif isinstance(value, tuple) and field.name == "tags":
            spelled = ["{}"] if not value else [str(dict(value))]
        elif isinstance(value, tuple):
            spelled = ["[]"] if not value else [f"[{', '.join(value)}]"]
        elif isinstance(value, float):
            spelled = [f"{value:g}", repr(value)]
        else:
            spelled = [str(value)]
        assert any(stated.startswith(s) and not stated[len(s)].isalnum() for s in spelled), (
            field.name, stated[:40], spelled)


def test_the_example_and_the_fields_must_agree(tmp_path: Path) -> None:
    text = manpages.INVENTORY_EXAMPLE.read_text()
    broken = tmp_path / "inventory.example.yaml"
    broken.write_text(text.replace("#   speed ", "#   sped  "))
    with pytest.raises(inventory_page.ExampleError, match=r"undescribed \['speed'\]"):
        inventory_page.read_example(broken)


def test_shell_completion_works_as_documented() -> None:
    words = rendered(MAN / "buildfarm.1")
    env = {**os.environ, "_BUILDFARM_COMPLETE": "bash_complete",
           "COMP_WORDS": "buildfarm mach", "COMP_CWORD": "1"}
    done = subprocess.run([sys.executable, "-m", "buildfarm"], env=env, capture_output=True,
                          text=True)
    assert done.stdout.split() == ["plain,machines"], done
    for shell in ("bash", "zsh", "fish"):
        assert f"_BUILDFARM_COMPLETE={shell}_source buildfarm" in words
        source = subprocess.run(
            [sys.executable, "-m", "buildfarm"], capture_output=True, text=True,
            env={**os.environ, "_BUILDFARM_COMPLETE": f"{shell}_source"},
        )
        assert source.returncode == 0 and "_BUILDFARM_COMPLETE" in source.stdout, shell


def test_the_web_page_documents_every_route_and_parameter() -> None:
    from buildfarm.web.api import ENDPOINTS
    from buildfarm.web.app import WebApp

    words = rendered(MAN / "buildfarm-web.7")
    app = WebApp("sqlite:///nowhere.db")
    try:
        routes = {r.resource.canonical for r in app.application().router.routes()
                  if r.resource is not None}
    finally:
        app.close_executor()
    routes.discard("/static/{name}")  # the page's own script and style
    assert routes
    for route in routes:
        assert route.replace("{uuid}", "UUID").replace("{name}", "NAME") in words or \
            route in words, route
    for endpoint in ENDPOINTS:
        assert f"{endpoint.method} {endpoint.path}" in words
        for name, _ in endpoint.parameters:
            assert f" {name} " in words, (endpoint.path, name)
