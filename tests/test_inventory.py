"""The inventory loader: valid files become frozen Machines, every mistake one located message."""

from __future__ import annotations

import dataclasses
import os
import platform
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildfarm.errors import InventoryError
from buildfarm.inventory import Inventory, Machine, load, local_system, parse

REPO = Path(__file__).resolve().parent.parent
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF0sHdelQLiXwPhrDz+5MNkUAkb6y1myvYb8a0g5QvJN"
FIELDS = [f.name for f in dataclasses.fields(Machine)]

FULL = f"""\
defaults:
  user: buildfarm
  identity: keys/id_ed25519
  known_hosts: /etc/buildfarm/known_hosts
  max_silent_time: 600
  substitute_urls: [http://farm.example.org:8080, https://ci.guix.gnu.org]
machines:
  - name: x86-a
    host: build1.example.org
    port: 2222
    user: root
    identity: /keys/x86
    known_hosts: ~/kh
    host_key: "{KEY}"
    transport: ssh
    systems: [x86_64-linux, i686-linux]
    max_builds: 4
    features: [kvm, big-parallel]
    tags: {{site: paris, gpu: a100}}
    speed: 2.5
    store: nix
    store_dir: /opt/nix/store
    overload_threshold: 0.8
    max_sessions: 4
    connect_timeout: 3
    keepalive_interval: 0
    answer_timeout: 30
    max_silent_time: 1_200
    timeout: 7200
    substitute_urls: ["file:///srv/cache"]
    enabled: false
  - name: here
    transport: local
"""


def test_full_inventory_loads_into_frozen_machines(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/ops")
    path = tmp_path / "farm.yaml"
    path.write_text(FULL)
    inventory = load(path)
    assert inventory == Inventory(
        path=str(path),
        machines=(
            Machine(
                name="x86-a", host="build1.example.org", port=2222, user="root",
                identity="/keys/x86", known_hosts="/home/ops/kh", host_key=KEY,
                transport="ssh", systems=("x86_64-linux", "i686-linux"), max_builds=4,
                features=("kvm", "big-parallel"), tags=(("gpu", "a100"), ("site", "paris")),
                speed=2.5, store="nix",
                store_dir="/opt/nix/store", overload_threshold=0.8, max_sessions=4,
                connect_timeout=3.0, keepalive_interval=0.0, answer_timeout=30.0,
                max_silent_time=1200, timeout=7200,
                substitute_urls=("file:///srv/cache",), enabled=False,
            ),
            Machine(
                name="here", host=None, user="buildfarm",
                identity=str(tmp_path / "keys" / "id_ed25519"),
                known_hosts="/etc/buildfarm/known_hosts", transport="local",
                systems=(local_system(),), max_silent_time=600,
                substitute_urls=("http://farm.example.org:8080", "https://ci.guix.gnu.org"),
            ),
        ),
    )
    first = inventory.machines[0]
    for name in FIELDS:  # the file above sets every field, differently from the default
        default = Machine.__dataclass_fields__[name].default
        assert any(getattr(m, name) != default for m in inventory.machines), name
    assert type(first.connect_timeout) is float and type(first.keepalive_interval) is float
    assert type(first.port) is int and type(first.enabled) is bool
    assert inventory.machine("here") is inventory.machines[1]
    assert inventory.build_retries == 0
    assert parse("build_retries: 3\nmachines: []\n").build_retries == 3
    with pytest.raises(KeyError):
        inventory.machine("nowhere")


def test_machines_and_inventory_are_frozen() -> None:
    inventory = parse(FULL)
    machine = inventory.machines[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        machine.port = 22  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        inventory.machines = ()  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        machine.extra = 1  # type: ignore[attr-defined]
    assert hash(machine) == hash(parse(FULL).machines[0])


def test_defaults_merge_machine_values_win() -> None:
    inventory = parse("""\
defaults:
  user: buildfarm
  port: 2200
  features: [kvm]
  store: nix
  timeout: 60
machines:
  - name: a
    host: a.example
  - name: b
    host: b.example
    port: 22
    features: [big-parallel]
    timeout: ~
""")
    a, b = inventory.machines
    assert (a.user, a.port, a.features, a.store, a.timeout) == ("buildfarm", 2200, ("kvm",),
                                                                 "nix", 60)
    assert (b.user, b.port, b.features, b.store, b.timeout) == ("buildfarm", 22,
                                                                 ("big-parallel",), "nix", None)


def test_minimal_machine_gets_documented_defaults() -> None:
    (machine,) = parse("machines:\n  - name: a\n    host: h\n").machines
    assert machine == Machine(name="a", host="h", systems=(local_system(),))
    assert (machine.port, machine.transport, machine.store, machine.max_builds) == (
        22, "ssh", "guix", 1)


def test_empty_machine_lists_and_null_defaults_are_valid() -> None:
    assert parse("machines: []\n", "x.yaml") == Inventory("x.yaml", ())
    assert parse("defaults:\nmachines:\n").machines == ()


def test_anchors_aliases_and_merges() -> None:
    inventory = parse("""\
machines:
  - &base {name: a, host: h, systems: &sys [aarch64-linux], speed: 3}
  - <<: *base
    name: b
    systems: *sys
  - <<: [{speed: 5, port: 1}, *base]
    name: c
""")
    a, b, c = inventory.machines
    assert (a.systems, a.speed) == (("aarch64-linux",), 3.0)
    assert (b.host, b.systems, b.speed) == ("h", ("aarch64-linux",), 3.0)
    assert (c.host, c.speed, c.port) == ("h", 5.0, 1)  # earlier merge sources win


def test_yaml_number_forms_and_names_as_written() -> None:
    (machine,) = parse("""\
machines:
  - name: 007
    host: 10.0.0.1
    port: 0x16
    speed: 1e3
    connect_timeout: 2.5
    enabled: no
""").machines
    assert (machine.name, machine.host, machine.port) == ("007", "10.0.0.1", 22)
    assert (machine.speed, machine.connect_timeout, machine.enabled) == (1000.0, 2.5, False)


def test_paths_expand_home_and_are_relative_to_the_inventory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/ops")
    text = "machines:\n  - {name: a, host: h, identity: ~/id, known_hosts: kh/known}\n"
    (machine,) = parse(text).machines
    assert (machine.identity, machine.known_hosts) == ("/home/ops/id", "kh/known")
    (machine,) = parse(text, base_dir="/etc/farm").machines
    assert machine.known_hosts == "/etc/farm/kh/known"


def test_local_system_spelling(monkeypatch: pytest.MonkeyPatch) -> None:
    assert re.fullmatch(r"[a-z0-9_]+-[a-z0-9_]+", local_system())
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    for machine, system in [("x86_64", "x86_64-linux"), ("aarch64", "aarch64-linux"),
                            ("arm64", "aarch64-linux"), ("armv7l", "armhf-linux"),
                            ("i686", "i686-linux"), ("ppc64le", "powerpc64le-linux")]:
        monkeypatch.setattr(platform, "machine", lambda m=machine: m)
        assert local_system() == system


# --- errors ---------------------------------------------------------------------------------

M = "machines:\n  - name: a\n    host: h\n"  # lines 1-3; a test line is line 4, its key at column 5


def m(line: str) -> str:
    return M + "    " + line + "\n"


VALID_KEYS = ", ".join(FIELDS)
ERRORS = [
    # YAML syntax
    ("machines: [a, b\n", "2:1: invalid YAML: while parsing a flow sequence, expected ',' or ']', "
     "but got '<stream end>'; check the YAML syntax here (indentation, quotes, brackets)"),
    (M + "\tport: 1\n", "4:1: invalid YAML: while scanning for the next token, found character "
     "'\\t' that cannot start any token; indent with spaces; YAML does not allow tabs there"),
    ('machines:\n  - name: "a\n', "3:1: invalid YAML: while scanning a quoted scalar, found "
     "unexpected end of stream; check the YAML syntax here (indentation, quotes, brackets)"),
    ("a: 1\n---\nb: 2\n", "2:1: invalid YAML: expected a single document in the stream, but found"
     " another document; keep the whole inventory in one YAML document (remove the '---')"),
    (m("port: *nope"), "4:11: invalid YAML: found undefined alias 'nope'; define the anchor "
     "(&name) before using it (*name)"),
    ("machines: [x\x00]", "1:13: invalid YAML: character #x0000 is not allowed; remove it, or "
     "write it as an escape inside double quotes"),
    ("machines:\r\n  - \x07", "2:5: invalid YAML: character #x0007 is not allowed; remove it, or "
     "write it as an escape inside double quotes"),
    ("[" * 3000, "1:1: invalid YAML: nested too deeply; flatten the structure"),
    # the top level
    ("", "1:1: the inventory is empty; write at least 'machines: []'"),
    ("# only a comment\n", "1:1: the inventory is empty; write at least 'machines: []'"),
    ("- name: a\n", "1:1: the inventory must be a mapping (key: value lines); write 'defaults:' "
     "and 'machines:' keys"),
    ("just text\n", "1:1: the inventory must be a mapping (key: value lines); write 'defaults:' "
     "and 'machines:' keys"),
    ("defaults: {}\n", "1:1: no 'machines:' key; add 'machines:' with a list"),
    ("machines: []\nmachine: []\n", "2:1: unknown key 'machine'; did you mean 'machines'?"),
    ("machines: []\ncolour: 1\n", "2:1: unknown key 'colour'; valid keys are: defaults, machines, "
     "build_retries"),
    ("machines: []\nport: 22\n", "2:1: unknown key 'port'; machine fields go under 'defaults:' or"
     " in an item of 'machines:'"),
    ("machines: []\nmachines: []\n", "2:1: duplicate key 'machines' (first at line 1); remove one"
     " of them"),
    ("machines: {name: a}\n", "1:11: machines must be a list; write each machine as a "
     "'- name: ...' item under 'machines:'"),
    ("machines:\n  - build1\n", "2:5: each machine must be a mapping (key: value lines); write "
     "each machine as '- name: NAME' with keys below it"),
    ("defaults: []\nmachines: []\n", "1:11: defaults must be a mapping (key: value lines); write "
     "'key: value' lines under 'defaults:'"),
    # keys
    (m("prot: 22"), "4:5: unknown key 'prot'; did you mean 'port'?"),
    (m("Port: 22"), "4:5: unknown key 'Port'; did you mean 'port'?"),
    (m("colour: blue"), f"4:5: unknown key 'colour'; valid keys are: {VALID_KEYS}"),
    ("defaults:\n  identiy: x\nmachines: []\n", "2:3: unknown key 'identiy'; did you mean "
     "'identity'?"),
    ("defaults:\n  host: h\nmachines: []\n", "2:3: host cannot be set in defaults; set host on "
     "each machine"),
    ("defaults:\n  name: h\nmachines: []\n", "2:3: name cannot be set in defaults; set name on "
     "each machine"),
    (m("host: g"), "4:5: duplicate key 'host' (first at line 3); remove one of them"),
    (m("? [a]\n    : b"), "4:7: a key must be a plain word; write keys like 'port:'"),
    (m("<<: 3"), "4:9: '<<' must merge a mapping; write '<<: *anchor' where &anchor names a "
     "mapping"),
    ("machines:\n  - &b {name: a, host: h, <<: *b}\n", "2:5: a merge (<<) refers to the mapping "
     "it is in; merge a different anchor"),
    # machines
    ("machines:\n  - name: a\n    port: 22\n", "2:5: machine 'a' has no host; add 'host: NAME' "
     "(or 'transport: local' for this host)"),
    ("machines:\n  - host: h\n", "2:5: this machine has no name; add 'name: NAME' (unique; "
     "letters, digits, '.', '_', '-')"),
    ("machines:\n  - name: a\n    host: h\n  - name: a\n    host: g\n", "4:11: duplicate machine"
     " name 'a' (first at line 2); give each machine a unique name"),
    ("machines:\n  - {<<: &b {name: a, host: h}}\n  - {<<: *b}\n", "3:5: duplicate machine name "
     "'a' (first at line 2); give each machine a unique name"),
    ('machines:\n  - name: "a b"\n    host: h\n', "2:11: bad name 'a b'; use letters, digits, "
     "'.', '_' and '-', starting with a letter or digit"),
    ("machines:\n  - name: -a\n    host: h\n", "2:11: bad name '-a'; use letters, digits, "
     "'.', '_' and '-', starting with a letter or digit"),
    ("machines:\n  - name: a/b\n    host: h\n", "2:11: bad name 'a/b'; use letters, digits, "
     "'.', '_' and '-', starting with a letter or digit"),
    ("machines:\n  - name: " + "a" * 65 + "\n    host: h\n", "2:11: bad name "
     "'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...'; use at most 64 characters"),
    # types
    (m("max_builds: four"), "4:17: max_builds must be an integer, not 'four'; write e.g. "
     "max_builds: 4"),
    (m("max_builds: 2.5"), "4:17: max_builds must be an integer, not '2.5'; write e.g. "
     "max_builds: 4"),
    (m("port: yes"), "4:11: port must be an integer, not the boolean 'yes'; YAML reads "
     "yes/no/on/off/true/false as booleans; write e.g. port: 22"),
    (m("speed: on"), "4:12: speed must be a number, not the boolean 'on'; YAML reads "
     "yes/no/on/off/true/false as booleans; write e.g. speed: 2.0"),
    (m("port: '22'"), "4:11: port must be an integer, not the quoted string '22'; remove the "
     "quotes; write e.g. port: 22"),
    (m("port: [22]"), "4:11: port must be an integer, not a list; write e.g. port: 22"),
    (m("port: {a: 1}"), "4:11: port must be an integer, not a mapping; write e.g. port: 22"),
    (m("port:"), "4:10: port must be an integer, not empty; write e.g. port: 22, or remove the "
     "key"),
    (m("port: !custom 22"), "4:11: unsupported YAML tag '!custom'; remove the tag"),
    (m("timeout: !!int ''"), "4:14: timeout must be an integer, not ''; write e.g. timeout: 86400"),
    (m("speed: fast"), "4:12: speed must be a number, not 'fast'; write e.g. speed: 2.0"),
    (m("speed: .nan"), "4:12: speed must be a number, not '.nan'; write e.g. speed: 2.0"),
    (m("connect_timeout: .inf"), "4:22: connect_timeout must be a number, not '.inf'; write e.g. "
     "connect_timeout: 10"),
    (m("enabled: maybe"), "4:14: enabled must be true or false, not 'maybe'; write e.g. "
     "enabled: true"),
    (m("enabled: 1"), "4:14: enabled must be true or false, not '1'; write e.g. enabled: true"),
    (m("user: [a]"), "4:11: user must be a string, not a list; write e.g. user: buildfarm"),
    (m("tags: [a]"), "4:11: tags must be a mapping (key: value lines); write e.g. tags: "
     "{site: paris, gpu: a100}"),
    (m("tags: {a: two words}"), "4:15: tags must be a mapping: the value of 'a' must be one "
     "word of printable ASCII (1 to 128 characters); write e.g. tags: {site: paris, gpu: a100}"),
    (m("tags: {a: }"), "4:14: tags must be a mapping: the value of 'a' must be one word of "
     "printable ASCII (1 to 128 characters); write e.g. tags: {site: paris, gpu: a100}"),
    (m("tags: {-a: b}"), "4:12: bad tag key '-a'; use letters, digits and _.:/- (starting with "
     "a letter, digit or _)"),
    ("build_retries: -1\nmachines: []\n", "1:16: build_retries must be between 0 and 100, "
     "not -1; write e.g. build_retries: 2"),
    ("build_retries: x\nmachines: []\n", "1:16: build_retries must be an integer, not 'x'; "
     "write e.g. build_retries: 2"),
    # values
    (m("port: 0"), "4:11: port must be between 1 and 65535, not 0; write e.g. port: 22"),
    (m("port: 70000"), "4:11: port must be between 1 and 65535, not 70000; write e.g. port: 22"),
    (m("max_builds: 0"), "4:17: max_builds must be between 1 and 1024, not 0; write e.g. "
     "max_builds: 4"),
    (m("max_builds: 1025"), "4:17: max_builds must be between 1 and 1024, not 1025; write e.g. "
     "max_builds: 4"),
    # The stores read these into 32-bit numbers: larger ones made every attempt fail.
    (m("max_silent_time: 18446744073709551616"), "4:22: max_silent_time must be between 1 and "
     "2147483647, not 18446744073709551616; write e.g. max_silent_time: 3600"),
    (m("timeout: 2147483648"), "4:14: timeout must be between 1 and 2147483647, not 2147483648; "
     "write e.g. timeout: 86400"),
    (m("connect_timeout: 1e300"), "4:22: connect_timeout must be between 0 and 86400, not 1e300; "
     "write e.g. connect_timeout: 10"),
    (m("max_sessions: -3"), "4:19: max_sessions must be between 1 and 1024, not -3; write e.g. "
     "max_sessions: 8"),
    (m("timeout: 0"), "4:14: timeout must be between 1 and 2147483647, not 0; write e.g. "
     "timeout: 86400"),
    (m("speed: 0"), "4:12: speed must be greater than 0, not 0; write e.g. speed: 2.0"),
    (m("speed: -1.5"), "4:12: speed must be greater than 0, not -1.5; write e.g. speed: 2.0"),
    (m("overload_threshold: 0"), "4:25: overload_threshold must be greater than 0, not 0; write "
     "e.g. overload_threshold: 0.8"),
    (m("keepalive_interval: -1"), "4:25: keepalive_interval must be between 0 and 86400, not -1; "
     "write e.g. keepalive_interval: 15"),
    (m("store: gix"), "4:12: unknown store 'gix'; did you mean 'guix'?"),
    (m("store: docker"), "4:12: unknown store 'docker'; use guix or nix"),
    *[(m(f"store_dir: {bad}"), f"4:16: bad store_dir {shown}; write an absolute directory "
       "without a trailing slash, e.g. store_dir: /gnu/store")
      for bad, shown in (("gnu/store", "'gnu/store'"), ("/gnu/store/", "'/gnu/store/'"),
                         ("/gnu/../etc", "'/gnu/../etc'"), ('"/gnu/st ore"', "'/gnu/st ore'"),
                         ("/", "'/'"))],
    (m("transport: sssh"), "4:16: unknown transport 'sssh'; did you mean 'ssh'?"),
    (m("transport: telnet"), "4:16: unknown transport 'telnet'; use ssh or local"),
    ("machines:\n  - name: a\n    host: ''\n", "3:11: bad host ''; write a host name or address, "
     "e.g. host: build1.example.org"),
    ("machines:\n  - name: a\n    host: me@h\n", "3:11: bad host 'me@h'; put the user name in "
     "user: and only the host in host:"),
    ("machines:\n  - name: a\n    host: h:2222\n", "3:11: bad host 'h:2222'; put the port number"
     " in port: and only the host in host:"),
    (m("user: ''"), "4:11: bad user ''; write a login name, or remove user: to use the current "
     "user or ~/.ssh/config"),
    (m("identity: ''"), "4:15: bad identity ''; write a file path, e.g. ~/.ssh/id_ed25519"),
    (m("host_key: AAAA"), "4:15: bad host_key 'AAAA'; write the key as '<type> <base64>', e.g. "
     "'ssh-ed25519 AAAAC3Nza...' (see ssh-keyscan HOST)"),
    (m(f"host_key: 'h {KEY}'"), "4:15: bad host_key 'h ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAA...'; "
     "drop the host name in front of the key type"),
    (m("host_key: 'ssh-ed2551 AAAA'"), "4:15: bad host_key 'ssh-ed2551 AAAA'; unknown key type "
     "'ssh-ed2551'; did you mean 'ssh-ed25519'?"),
    (m("host_key: 'ssh-ed25519 AA!A'"), "4:15: bad host_key 'ssh-ed25519 AA!A'; the key data is "
     "not valid base64; write the key as '<type> <base64>', e.g. 'ssh-ed25519 AAAAC3Nza...'"),
    (m(f"host_key: '{KEY.replace('ssh-ed25519', 'ssh-rsa')}'"), "4:15: bad host_key 'ssh-rsa "
     "AAAAC3NzaC1lZDI1NTE5AAAAIF0sH...'; the key data does not match the type ssh-rsa; copy it "
     "from ssh-keyscan"),
    (m("systems: x86_64-linux"), "4:14: systems must be a list of strings, not 'x86_64-linux'; "
     "write e.g. systems: [x86_64-linux]"),
    (m("systems: ~"), "4:14: systems must be a list of strings, not '~'; write e.g. "
     "systems: [x86_64-linux]"),
    (m("systems: {a: b}"), "4:14: systems must be a list of strings, not a mapping; write e.g. "
     "systems: [x86_64-linux]"),
    (m("systems: [x86_64]"), "4:15: bad system 'x86_64'; write a system as arch-kernel, e.g. "
     "x86_64-linux or aarch64-linux"),
    (m("systems: [x86_64-linux-gnu]"), "4:15: bad system 'x86_64-linux-gnu'; write a system as "
     "arch-kernel, e.g. x86_64-linux or aarch64-linux"),
    (m("systems: [[x86_64-linux]]"), "4:15: each item of systems must be a string; write e.g. "
     "systems: [x86_64-linux]"),
    (m("systems: [~]"), "4:15: each item of systems must be a string; write e.g. "
     "systems: [x86_64-linux]"),
    (m("systems: [x86_64-linux, x86_64-linux]"), "4:29: 'x86_64-linux' appears twice in systems; "
     "remove one of them"),
    (m("features: [kvm, 'big parallel']"), "4:21: bad feature 'big parallel'; write a feature as "
     "one word, e.g. kvm or big-parallel"),
    (m("substitute_urls: [ftp://farm]"), "4:23: bad substitute_url 'ftp://farm'; write an "
     "http://, https:// or file:// URL without spaces, e.g. http://farm:8080"),
    (m("substitute_urls: http://farm"), "4:22: substitute_urls must be a list of strings, not "
     "'http://farm'; write e.g. substitute_urls: [http://farm.example.org:8080]"),
    # errors inside defaults point into defaults
    ("defaults:\n  max_builds: many\nmachines: []\n", "2:15: max_builds must be an integer, not "
     "'many'; write e.g. max_builds: 4"),
]


@pytest.mark.parametrize(("text", "expected"), ERRORS, ids=[e[1][:40] for e in ERRORS])
def test_error_names_file_line_column_and_hint(text: str, expected: str) -> None:
    with pytest.raises(InventoryError) as caught:
        parse(text, "inv.yaml")
    assert str(caught.value) == f"inv.yaml:{expected}"


def test_systems_empty_hint_names_this_host() -> None:
    with pytest.raises(InventoryError) as caught:
        parse(m("systems: []"), "inv.yaml")
    assert str(caught.value) == (
        "inv.yaml:4:14: systems must not be empty; write e.g. systems: [x86_64-linux], or "
        f"remove the key to use this host's ({local_system()})")


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(InventoryError, match=r"^") as caught:
        load(missing)
    assert str(caught.value) == f"{missing}: cannot read: No such file or directory"
    with pytest.raises(InventoryError) as caught:
        load(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read: Is a directory"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"machines:\n  - name: caf\xe9\n")
    with pytest.raises(InventoryError) as caught:
        load(latin1)
    assert str(caught.value) == (
        f"{latin1}:2:14: cannot read: not UTF-8 text (byte 0xe9); save the file as UTF-8")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfmachines: []\n")
    assert load(str(bom)) == Inventory(str(bom), ())


def test_merge_bombs_finish() -> None:
    """Each level merges the previous one twice; walking without memory would take 2**40 steps."""
    lines = ["machines:", "  - &l0 {name: a, host: h}"]
    lines += [f"  - &l{i} {{<<: [*l{i - 1}, *l{i - 1}], name: m{i}}}" for i in range(1, 41)]
    inventory = parse("\n".join(lines) + "\n")
    assert len(inventory.machines) == 41 and inventory.machines[-1].host == "h"


# --- the example file -------------------------------------------------------------------------


def test_example_inventory_loads_and_documents_every_field() -> None:
    path = REPO / "inventory.example.yaml"
    inventory = load(path)
    assert [m.name for m in inventory.machines] == ["x86-a", "arm-b"]
    assert all(m.transport == "ssh" for m in inventory.machines)
    comments = "\n".join(line.split("#", 1)[1] for line in path.read_text().splitlines()
                         if "#" in line)
    for name in FIELDS:
        assert re.search(rf"(?<![a-z_]){name}(?![a-z_])", comments), f"{name} is not documented"
    assert "transport: local" in comments  # the commented-out local machine


# --- fuzzing --------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("BUILDFARM_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MESSAGE = re.compile(r"fuzz\.yaml:(\d+):(\d+): ([^\n]+); ([^\n]+)")
LINE_BREAKS = re.compile("\r\n|[\r\n\x85\u2028\u2029]")


def check(text: str) -> None:
    """parse() either succeeds with sound machines or raises a located InventoryError."""
    try:
        inventory = parse(text, "fuzz.yaml")
    except InventoryError as exc:
        found = MESSAGE.fullmatch(str(exc))
        assert found, str(exc)
        assert 1 <= int(found[1]) <= len(LINE_BREAKS.findall(text)) + 1
        assert int(found[2]) >= 1
        return
    names = [machine.name for machine in inventory.machines]
    assert len(names) == len(set(names))
    for machine in inventory.machines:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", machine.name)
        assert machine.host is not None or machine.transport == "local"
        assert 1 <= machine.port <= 65535 and machine.max_builds >= 1
        assert machine.speed > 0 and machine.store in ("guix", "nix")
        # The documented ranges: what the stores, the datastore and asyncio can take.
        assert machine.max_builds <= 1024 and 1 <= machine.max_sessions <= 1024
        assert all(t is None or 1 <= t <= 2**31 - 1
                   for t in (machine.max_silent_time, machine.timeout))
        assert 0 < machine.connect_timeout <= 86400 and 0 < machine.answer_timeout <= 86400
        assert 0 <= machine.keepalive_interval <= 86400
        assert machine.systems and all(isinstance(s, str) for s in machine.systems)
        assert isinstance(machine.enabled, bool)


YAMLISH = st.text(alphabet=":-[]{}#&*!|>'\"%@`,?<=~ \n\t0123456789abcenoxyz._", max_size=120)


@FUZZ
@given(st.one_of(st.text(max_size=200), YAMLISH))
def test_fuzz_random_text(text: str) -> None:
    check(text)
    check("machines:\n  - name: a\n    host: h\n    " + text)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                    st.sampled_from(["x86_64-linux", "guix", "nix", "ssh", "local", "h.example",
                                     "kvm", KEY, "~/.ssh/id", "0", "-1", "yes"]))


def nested(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.lists(inner, max_size=4),
                     st.dictionaries(st.text(max_size=8), inner, max_size=4))


VALUES = st.recursive(SCALARS, nested, max_leaves=12)
KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS), st.text(max_size=10))
MACHINES = st.dictionaries(KEYS, VALUES, max_size=8)


NUMERIC = ("port", "max_builds", "max_sessions", "connect_timeout", "keepalive_interval",
           "answer_timeout", "max_silent_time", "timeout", "speed", "overload_threshold")


@FUZZ
@given(key=st.sampled_from(NUMERIC), value=st.one_of(
    st.integers(), st.floats(), st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(["18446744073709551616", "1e309", ".inf", "-.nan", "0x7fffffff", "1_0"]),
))
def test_fuzz_numbers_are_taken_in_their_range_or_refused_where_they_are(
    key: str, value: object
) -> None:
    check(f"machines:\n  - name: a\n    host: h\n    {key}: {value}\n")


@FUZZ
@given(st.one_of(
    VALUES,
    st.fixed_dictionaries({"machines": st.lists(MACHINES, max_size=4)},
                          optional={"defaults": MACHINES, "extra": VALUES}),
))
def test_fuzz_random_structures(data: object) -> None:
    check(yaml.safe_dump(data))
    check(yaml.safe_dump(data, default_flow_style=True))


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes_through_load(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "fuzz.yaml")
        with open(path, "wb") as stream:
            stream.write(data)
        try:
            load(path)
        except InventoryError as exc:
            assert str(exc).startswith(path + ":"), str(exc)
            assert "\n" not in str(exc)
