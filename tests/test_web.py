"""`buildfarm web`: pages, JSON API, event stream and log stream, against a real server process
on a datastore filled through the datastore's own API (on every engine).

Hostile strings (markup and script in derivation names, tags, reasons, missing paths, machine
names and logs) are planted everywhere a user or a machine controls text; every page is parsed
to check that none of them became markup, and every response that the datastore URL and the
signing key never appear in.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from engines import ScratchDatabase

from buildfarm.formats import derivation as drvmod
from buildfarm.logs import LogWriter
from buildfarm.submission import ReadDerivation, SubmitOptions, text_store_path

STORE = "/gnu/store"
SYSTEM = "x86_64-linux"
EVIL_NAME = "evil-\"'><img src=x onerror=alert(1)>"
EVIL_TAG = "<script>alert(2)</script>"
EVIL_REASON = "</td></tr><script>alert(3)</script>"
EVIL_LOG = "</pre><script>alert(4)</script>\n"
EVIL_MISSING = f"{STORE}/{'z' * 32}-<b onmouseover=alert(5)>x</b>"
EVIL_MACHINE = "m<i>2</i>"
HOSTILE = (EVIL_NAME, EVIL_TAG, EVIL_REASON, EVIL_LOG.strip(), EVIL_MISSING, EVIL_MACHINE)
START_TIMEOUT = 30.0


# -- a datastore with a little of everything ------------------------------------------------


def make_drv(name: str, inputs: tuple[str, ...] = (), system: str = SYSTEM) -> ReadDerivation:
    """A derivation named `name` (any text: the datastore must cope with what it is given)."""
    digest = hashlib.sha256(f"{name}-{inputs}".encode()).hexdigest()[:32]
    out = f"{STORE}/{digest}-{name}"
    drv = drvmod.Derivation(
        outputs=(drvmod.DerivationOutput("out", out, "", ""),),
        input_drvs=tuple((i, ("out",)) for i in inputs),
        input_srcs=(),
        system=system,
        builder="/bin/sh",
        args=("-c", "true"),
        env=(("name", name), ("out", out), ("system", system)),
    )
    contents = drvmod.serialize(drv)
    return ReadDerivation(text_store_path(STORE, f"{name}.drv", contents, ()), drv, contents)


def submit(*items: ReadDerivation, tags: tuple[tuple[str, str], ...] = (),
           priority: int = 0) -> list[str]:
    from buildfarm.datastore.builds import record_submission

    done = record_submission(list(items), [], SubmitOptions(tags=tags, priority=priority),
                             time.time())
    return [s.uuid for s in done]


def start_attempt(machine: str, system: str = SYSTEM) -> Any:
    from buildfarm.coordinator import scheduler

    attempt = scheduler.allocate(scheduler.Slot(machine, (system,), frozenset()))
    assert attempt is not None
    return attempt


def write_log(logs: Path, uuid: str, attempt_id: int, text: str) -> str:
    path = logs / f"{uuid}-{attempt_id}.log.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    return str(path)


@dataclass
class Farm:
    """What the populated datastore holds, for the tests to look for."""

    state: Path
    url: str
    inventory: Path
    builds: dict[str, str] = field(default_factory=dict)  # role -> UUID
    drvs: dict[str, str] = field(default_factory=dict)  # role -> .drv path
    running_log: str = ""
    writer: LogWriter | None = None


def populate(state: Path, url: str) -> Farm:
    """A leaf that succeeded (hostile name, tag and log), a library that failed (hostile
    reason), an app that depends on both and had a setup failure (hostile missing path), and
    a build still running on a hostile machine name."""
    from buildfarm.datastore import attempts as records
    from buildfarm.datastore import open_datastore

    logs = state / "logs"
    inventory = state / "inventory.yaml"
    inventory.write_text(
        "machines:\n"
        "  - name: m1\n    host: build-host.example.org\n    user: builder\n"
        f"    identity: {state}/secret-identity-file\n"
        f"    systems: [{SYSTEM}]\n    max_builds: 2\n    store: guix\n"
    )
    farm = Farm(state, url, inventory)
    leaf, lib = make_drv(EVIL_NAME), make_drv("libfoo-1.0")
    app = make_drv("app-2.1", (leaf.path, lib.path))
    other = make_drv("other-0.1", system="aarch64-linux")
    with open_datastore(url) as store:
        del store
        farm.builds["leaf"], = submit(leaf, tags=(("owner", EVIL_TAG), ("jobset", "master")),
                                      priority=9)
        farm.builds["lib"], = submit(lib, tags=(("jobset", "master"),), priority=8)
        farm.builds["app"], = submit(app, tags=(("jobset", "master"),))
        farm.builds["other"], = submit(other, tags=(("jobset", "staging"),))
        farm.drvs.update(leaf=leaf.path, lib=lib.path, app=app.path, other=other.path)

        attempt = start_attempt("m1")
        assert attempt.build.uuid == farm.builds["leaf"]
        log = write_log(logs, farm.builds["leaf"], attempt.id, "leaf building\n" + EVIL_LOG)
        records.step(attempt.id, "build", log_path=log)
        records.succeed(attempt.id, [], log, "differs")  # rebuilt with --check

        attempt = start_attempt("m1")
        assert attempt.build.uuid == farm.builds["lib"]
        records.step(attempt.id, "build")
        records.fail(attempt.id, 2, EVIL_REASON, None)

        # The app's input failed, so the app failed too (dependency-failed).
        attempt = start_attempt(EVIL_MACHINE, "aarch64-linux")
        assert attempt.build.uuid == farm.builds["other"]
        records.step(attempt.id, "dry-run")
        records.setup_failure(attempt.id, "missing-inputs", [EVIL_MISSING, leaf.path],
                              "inputs missing", 0.0)
        from buildfarm.datastore.models import Build, Event

        Build.update(retry_after=None).where(Build.uuid == farm.builds["other"]).execute()
        # Its hooks ran (the build waits for them before it is tried again).
        Event.update(delivered_at=time.time()).where(Event.name == "build-missing-inputs").execute()
        attempt = start_attempt(EVIL_MACHINE, "aarch64-linux")
        farm.running_log = str(logs / f"{farm.builds['other']}-{attempt.id}.log.gz")
        farm.writer = LogWriter(farm.running_log)  # as the coordinator writes it
        records.step(attempt.id, "build", log_path=farm.running_log)
        farm.writer.write(b"first line\n")
        farm.writer.flush()
        farm.builds["running"] = farm.builds["other"]
        farm.builds["queued"], = submit(make_drv("waiting-3"))
    return farm


# -- the server ----------------------------------------------------------------------------


class WebServer:
    """`buildfarm web --listen 127.0.0.1:0` as a process of its own."""

    def __init__(self, env: dict[str, str], *global_args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "buildfarm", *global_args, "web", "--listen", "127.0.0.1:0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        found = re.search(r"http://[\d.]+:\d+/", line)
        if found is None:
            self.process.kill()
            _, err = self.process.communicate(timeout=START_TIMEOUT)
            raise AssertionError(f"buildfarm web did not start: {line!r} {err}")
        self.url = found.group(0).rstrip("/")
        self.netloc = urllib.parse.urlsplit(self.url).netloc

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str],
                                                                              str]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, dict(response.headers), response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read().decode()

    def json(self, path: str) -> Any:
        status, headers, body = self.get(path)
        assert status == 200, (path, status, body)
        assert headers["Content-Type"].startswith("application/json")
        return json.loads(body)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            raise AssertionError("buildfarm web did not stop on SIGTERM") from None
        assert self.process.returncode == 0, err
        return err


def server_env(state: Path, url: str, inventory: Path) -> dict[str, str]:
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state), "BUILDFARM_DB": url,
           "BUILDFARM_INVENTORY": str(inventory)}
    env.pop("BUILDFARM_HOOKS_DIR", None)
    return env


@pytest.fixture
def farm(database: ScratchDatabase, tmp_path: Path) -> Iterator[Farm]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    made = populate(state, database.url)
    try:
        yield made
    finally:
        if made.writer is not None:
            made.writer.close()


@pytest.fixture
def server(farm: Farm) -> Iterator[WebServer]:
    web = WebServer(server_env(farm.state, farm.url, farm.inventory))
    try:
        yield web
    finally:
        errors = web.stop()
    assert errors == ""  # no traceback, not even for clients that went away


# -- reading pages -------------------------------------------------------------------------


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text, of a page."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, tag: str, **wanted: str | bool) -> list[dict[str, str | None]]:
        """The attributes of every `tag` element with these attributes (True: present)."""

        def matches(attrs: dict[str, str | None], name: str, value: str | bool) -> bool:
            name = name.replace("_", "-")
            return name in attrs if value is True else attrs.get(name) == value

        return [a for t, a in self.tags
                if t == tag and all(matches(a, k, v) for k, v in wanted.items())]


def assert_safe(page: str) -> Elements:
    """No planted string became markup: the only script is ours, no element has an event
    handler or a javascript: link, and nothing we never write (img, b, i) appears."""
    parsed = Elements(page)
    for tag, attrs in parsed.tags:
        if tag == "script":
            assert attrs == {"src": "/static/app.js", "defer": None}, attrs
        assert tag not in ("img", "b", "i", "iframe", "object"), (tag, attrs)
        for name, value in attrs.items():
            assert not name.startswith("on"), (tag, attrs)
            assert not (value or "").strip().lower().startswith("javascript:"), (tag, attrs)
    return parsed


PAGES = ("/", "/builds", "/machines", "/machines/m1", "/api")


def every_path(farm: Farm) -> list[str]:
    builds = [f"/builds/{u}" for u in farm.builds.values()]
    quoted = urllib.parse.quote(EVIL_MACHINE, safe="")
    return [*PAGES, *builds, f"/machines/{quoted}", f"/builds/{farm.builds['leaf']}/log",
            "/builds?tag=" + urllib.parse.quote(f"owner={EVIL_TAG}"),
            "/builds?name=" + urllib.parse.quote(EVIL_NAME)]


# -- tests ---------------------------------------------------------------------------------


def test_html_is_escaped_by_construction() -> None:
    from buildfarm.web.html import Markup, h, join, url

    assert h("p", None, "<b>&\"'") == "<p>&lt;b&gt;&amp;&quot;&#x27;</p>"
    assert h("a", {"href": '" onclick="x', "title": None, "hidden": True}, 1) == (
        '<a href="&quot; onclick=&quot;x" hidden>1</a>')
    assert h("p", None, Markup("<i>ours</i>"), ["<", None, False]) == "<p><i>ours</i>&lt;</p>"
    assert join("<", h("br")) == "&lt;<br>"
    assert h("svg", None, h("rect", {"x": 1}), h("line")) == '<svg><rect x="1"/><line/></svg>'
    assert h("td", {"class_": "num", "data_since": 5}) == '<td class="num" data-since="5"></td>'
    with pytest.raises(ValueError):
        h("a", {"on click": "x"})
    with pytest.raises(ValueError):
        h("a b")
    assert url(["builds", "a/b?c"], [("tag", "k=v&x"), ("name", "")]) == (
        "/builds/a%2Fb%3Fc?tag=k%3Dv%26x")


def test_overview_shows_queue_machines_running_results_and_chart(
    server: WebServer, farm: Farm
) -> None:
    data = server.json("/api/overview")
    assert {q["system"]: q["queued"] for q in data["queue"]} == {SYSTEM: 1}
    machines = {m["name"]: m for m in data["machines"]}
    assert machines["m1"]["state"] == "idle" and machines["m1"]["slots"] == 2
    assert machines["m1"]["free"] == 2 and machines["m1"]["in_inventory"]
    assert machines[EVIL_MACHINE]["state"] == "retired" and machines[EVIL_MACHINE]["busy"] == 1
    (running,) = data["running"]
    assert running["build"] == farm.builds["running"] and running["step"] == "build"
    assert running["machine"] == EVIL_MACHINE and running["step_started"] is not None
    results = {a["build"]: a["result"] for a in data["recent"]}
    assert results[farm.builds["leaf"]] == "success"
    assert results[farm.builds["lib"]] == "failure"
    assert results[farm.builds["other"]] == "setup-failure"
    # Builds that ended, each once: the leaf succeeded; the library failed, and the app with
    # it (dependency-failed, without an attempt). Attempts apart: three ended, one a setup
    # failure (the build went back to the queue).
    assert len(data["per_hour"]) == 24
    totals = {key: sum(h[key] for h in data["per_hour"]) for key in data["per_hour"][0]
              if key != "hour"}
    assert totals == {"succeeded": 1, "failed": 2, "canceled": 0, "attempts": 3,
                      "setup_failures": 1, "interrupted": 0}

    status, headers, page = server.get("/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    parsed = assert_safe(page)
    assert parsed.all("tr", data_uuid=farm.builds["running"])
    assert parsed.all("svg", **{"class": "chart"})
    assert len(parsed.all("rect", **{"class": "ok"})) == 1  # this hour's builds that ended
    assert len(parsed.all("rect", **{"class": "bad"})) == 1
    assert "h: builds 1 succeeded, 2 failed; attempts 3 (setup failures 1)" in "".join(
        parsed.text)
    assert parsed.all("a", href="/machines/m1")
    for section in ("queue", "machines", "running", "recent", "per-hour"):
        assert parsed.all("section", id=section, data_live=True)


def test_build_page_shows_derivation_inputs_dependants_attempts_and_log(
    server: WebServer, farm: Farm
) -> None:
    app = server.json(f"/api/builds/{farm.builds['app']}")
    assert app["state"] == "failed"
    assert app["reason"] == f"dependency-failed: {farm.drvs['lib']} (build {farm.builds['lib']})"
    assert app["cause"] == {"build": farm.builds["lib"], "derivation": farm.drvs["lib"]}
    page = server.get(f"/builds/{farm.builds['app']}")[2]
    assert f'href="/builds/{farm.builds["lib"]}"' in page and "Root cause" in page
    inputs = {i["derivation"]: (i["build"], i["state"]) for i in app["inputs"]}
    assert inputs == {farm.drvs["leaf"]: (farm.builds["leaf"], "succeeded"),
                      farm.drvs["lib"]: (farm.builds["lib"], "failed")}

    leaf = server.json(f"/api/builds/{farm.builds['leaf']}")
    assert leaf["name"] == EVIL_NAME and leaf["tags"] == {"jobset": "master", "owner": EVIL_TAG}
    assert [(d["derivation"], d["state"]) for d in leaf["dependants"]] == [
        (farm.drvs["app"], "failed")]
    (attempt,) = leaf["attempts"]
    assert attempt["machine"] == "m1" and attempt["result"] == "success"
    assert [s["name"] for s in attempt["steps"]] == ["build"]
    assert attempt["steps"][0]["duration"] is not None and attempt["has_log"]
    assert "log" not in attempt  # where logs live on the coordinator is not for the web
    assert attempt["check"] == "differs" and leaf["reproducible"] is False
    assert "no: a rebuild gave different outputs" in server.get(
        f"/builds/{farm.builds['leaf']}")[2]

    other = server.json(f"/api/builds/{farm.builds['other']}")
    failed, current = other["attempts"]
    assert failed["result"] == "setup-failure" and failed["setup_failure"] == "missing-inputs"
    missing = {m["path"]: m for m in failed["missing_inputs"]}
    assert set(missing) == {EVIL_MISSING, farm.drvs["leaf"]}
    assert missing[farm.drvs["leaf"]]["build"] == farm.builds["leaf"]
    assert missing[farm.drvs["leaf"]]["state"] == "succeeded"
    assert current["result"] is None and other["running"]

    status, _, page = server.get(f"/builds/{farm.builds['leaf']}")
    assert status == 200
    parsed = assert_safe(page)
    assert EVIL_LOG.strip() in "".join(parsed.text)  # the log, as text
    assert parsed.all("a", href=f"/builds/{farm.builds['app']}")
    assert not parsed.all("pre", data_log_stream=f"/builds/{farm.builds['leaf']}/log/stream")
    _, _, running_page = server.get(f"/builds/{farm.builds['running']}")
    pre = assert_safe(running_page).all("pre", id="log-text")
    assert pre[0]["data-log-stream"] == f"/builds/{farm.builds['running']}/log/stream"
    assert pre[0]["data-offset"] == str(len("first line\n"))

    status, headers, text = server.get(f"/builds/{farm.builds['leaf']}/log")
    assert status == 200 and text == "leaf building\n" + EVIL_LOG
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_build_page_says_why_a_build_waits_and_that_one_is_flaky(
    server: WebServer, farm: Farm, database: ScratchDatabase
) -> None:
    queued = server.json(f"/api/builds/{farm.builds['queued']}")
    assert queued["waiting"]["reason"] == "no-coordinator"
    page = assert_safe(server.get(f"/builds/{farm.builds['queued']}")[2])
    assert queued["waiting"]["summary"] in "".join(page.text)
    assert server.json(f"/api/builds/{farm.builds['leaf']}")["waiting"] is None
    database.execute(f"UPDATE build SET builder_failures = 2 WHERE uuid = '{farm.builds['leaf']}'")
    leaf = server.json(f"/api/builds/{farm.builds['leaf']}")
    assert (leaf["flaky"], leaf["builder_failures"]) == (True, 2)
    assert "yes: it succeeded after 2 builder failure(s)" in server.get(
        f"/builds/{farm.builds['leaf']}")[2]


def test_machine_pages_show_status_attempts_and_success_rate(
    server: WebServer, farm: Farm
) -> None:
    """A machine's success rate is over the builds it finished (succeeded or failed); its
    setup failures (inputs missing: the build goes back to the queue) are counted apart."""
    from buildfarm.datastore import attempts as records
    from buildfarm.datastore import open_datastore

    with open_datastore(farm.url):
        submit(make_drv("needs-inputs-1"))
        for _ in range(2):  # the waiting-3 build once, the new one once
            attempt = start_attempt("m1")
            records.setup_failure(attempt.id, "missing-inputs", [], "inputs missing", 3600.0)
    m1 = server.json("/api/machines/m1")
    assert m1["systems"] == [SYSTEM] and m1["slots"] == 2 and m1["state"] == "idle"
    assert m1["results"] == {"success": 1, "failure": 1, "setup-failure": 2, "interrupted": 0}
    assert m1["finished"] == 2
    assert m1["success_rate"] == 0.5 and m1["recent_success_rate"] == 0.5
    assert m1["recent_window"] == 2
    assert [a["result"] for a in m1["attempts"]] == [
        "setup-failure", "setup-failure", "failure", "success"]
    text = " ".join(" ".join(assert_safe(server.get("/machines/m1")[2]).text).split())
    assert "50.0 % of the 2 builds it finished (succeeded or failed)" in text
    assert "Setup failures 2 (inputs missing" in text
    for secret in ("build-host.example.org", "builder", "secret-identity-file"):
        assert secret not in json.dumps(m1)
    evil = server.json("/api/machines/" + urllib.parse.quote(EVIL_MACHINE, safe=""))
    assert [a["result"] for a in evil["attempts"]] == [None, "setup-failure"]
    assert evil["finished"] == 0 and evil["success_rate"] is None  # nothing held against it
    assert evil["busy"] == 1 and not evil["in_inventory"]
    machines = server.json("/api/machines")
    assert [m["name"] for m in machines] == ["m1", EVIL_MACHINE]
    status, _, _ = server.get("/machines/nobody")
    assert status == 404


def test_hostile_strings_are_text_on_every_page(server: WebServer, farm: Farm) -> None:
    seen = ""
    for path in every_path(farm):
        status, headers, page = server.get(path, {"Accept": "text/html"})
        assert status == 200, (path, page)
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
        if headers["Content-Type"].startswith("text/html"):
            seen += "".join(assert_safe(page).text)
            for hostile in HOSTILE:
                assert hostile not in page, (path, hostile)
    for hostile in HOSTILE:
        assert hostile in seen, hostile  # shown, as text


def test_api_round_trips_hostile_strings_and_never_emits_markup(
    server: WebServer, farm: Farm
) -> None:
    status, _, body = server.get(f"/api/builds/{farm.builds['leaf']}")
    assert status == 200 and "<" not in body and ">" not in body
    assert json.loads(body)["tags"]["owner"] == EVIL_TAG
    listed = server.json("/api/builds?tag=" + urllib.parse.quote(f"owner={EVIL_TAG}"))
    assert [b["uuid"] for b in listed["builds"]] == [farm.builds["leaf"]]
    named = server.json("/api/builds?name=" + urllib.parse.quote(EVIL_NAME))
    assert [b["name"] for b in named["builds"]] == [EVIL_NAME]


def test_secrets_and_the_datastore_url_are_never_shown(
    farm: Farm, database: ScratchDatabase, tmp_path: Path
) -> None:
    from buildfarm.formats import keys

    keys.generate(str(farm.state))
    secrets = [path.read_text() for path in farm.state.glob("*secret*") if path.is_file()]
    secret_words = [w for text in secrets for w in text.split() if len(w) >= 20]
    assert secret_words
    web = WebServer(server_env(farm.state, farm.url, farm.inventory))
    try:
        paths = [*every_path(farm), "/builds/not-a-uuid", "/builds?state=bogus",
                 "/api/builds?limit=x", "/api/builds/00000000-0000-0000-0000-000000000000",
                 "/events?last_event_id=-1", "/nowhere", "/api/overview", "/api/machines",
                 "/api/builds/" + farm.builds["leaf"] + "/log/stream?offset=0",
                 f"/api/builds/{farm.builds['app']}", "/api/machines/m1"]
        statuses = set()
        for path in paths:
            status, headers, body = web.get(path)
            statuses.add(status)
            for secret in (farm.url, str(farm.state), *secret_words, "build-host.example.org"):
                assert secret not in body, (path, secret)
                assert all(secret not in v for v in headers.values()), (path, secret)
        assert statuses == {200, 400, 404}
        replay = EventStream(web.netloc, last_event_id=0)
        events = replay.take(len(stored_events(database)))
        replay.close()
        assert any(payload.get("log") for _, _, payload in events)
        for secret in (farm.url, str(farm.state), *secret_words):
            assert secret not in json.dumps(events), secret
    finally:
        web.stop()


def test_the_web_server_writes_nothing(farm: Farm, database: ScratchDatabase) -> None:
    """Read-only: every page, API call, log and event replay leaves the datastore as it was."""
    before = database.dump()
    web = WebServer(server_env(farm.state, farm.url, farm.inventory))
    try:
        api = [p.replace("/builds", "/api/builds", 1) if p.startswith("/builds/") else p
               for p in every_path(farm)]
        for path in [*every_path(farm), *api, "/api/overview", "/api/machines", "/api"]:
            assert web.get(path)[0] == 200, path
        replay = EventStream(web.netloc, last_event_id=0)
        replay.take(len(stored_events(database)))
        replay.close()
    finally:
        web.stop()
    assert database.dump() == before


# -- the event stream ----------------------------------------------------------------------


class EventStream:
    """A client of /events, reading server-sent events off a raw HTTP connection."""

    def __init__(self, netloc: str, last_event_id: int | None = None) -> None:
        self.connection = http.client.HTTPConnection(netloc, timeout=30)
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        self.connection.request("GET", "/events", headers=headers)
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Content-Type", "").startswith("text/event-stream")

    def next(self) -> tuple[int, str, dict[str, Any]]:
        """The next event: (id, name, payload); comments and retry lines are skipped."""
        fields: dict[str, str] = {}
        data: list[str] = []
        while True:
            line = self.response.readline().decode()
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if not line:
                if data:
                    return int(fields["id"]), fields["event"], json.loads("\n".join(data))
                fields = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            if name == "data":
                data.append(value)
            else:
                fields[name] = value

    def take(self, count: int) -> list[tuple[int, str, dict[str, Any]]]:
        return [self.next() for _ in range(count)]

    def close(self) -> None:
        self.connection.close()


def stored_events(database: ScratchDatabase) -> list[tuple[int, str, dict[str, Any]]]:
    """The events as stored, their log shown as its URL path (as the web shows it)."""
    rows = database.rows("SELECT id, name, payload FROM event ORDER BY id")
    events = [(int(i), str(n), json.loads(p)) for i, n, p in rows]
    for _, _, payload in events:
        if payload.get("log"):
            payload["log"] = f"/builds/{payload['build']['uuid']}/log"
    return events


def test_event_stream_follows_the_farm_and_resumes_where_it_left(
    server: WebServer, farm: Farm, database: ScratchDatabase
) -> None:
    before = stored_events(database)
    live = EventStream(server.netloc)  # from now on: none of the events before
    fresh = [make_drv(f"fresh-{n}") for n in range(6)]
    submit(*fresh[:3], tags=(("batch", "one"),))
    got = live.take(3)
    assert [name for _, name, _ in got] == ["build-submitted"] * 3
    assert [p["build"]["derivation"] for _, _, p in got] == [d.path for d in fresh[:3]]
    live.close()
    submit(*fresh[3:], tags=(("batch", "two"),))  # while the client is away
    again = EventStream(server.netloc, last_event_id=got[-1][0])
    rest = again.take(3)
    again.close()
    assert stored_events(database) == before + got + rest
    replay = EventStream(server.netloc, last_event_id=0)
    assert replay.take(len(before) + 6) == stored_events(database)
    replay.close()
    assert server.get("/events?last_event_id=nope")[0] == 400


def test_log_stream_sends_what_follows_the_offset_and_ends_with_the_build(
    server: WebServer, farm: Farm
) -> None:
    from buildfarm.datastore import attempts as records
    from buildfarm.datastore.models import Attempt, Build

    uuid, writer = farm.builds["running"], farm.writer
    assert writer is not None
    stream = f"/builds/{uuid}/log/stream"
    connection = http.client.HTTPConnection(server.netloc, timeout=30)
    connection.request("GET", stream + "?offset=6")  # "first line\n": skip "first "
    response = connection.getresponse()
    assert response.status == 200
    text, ids = "", []
    while text != "line\n":
        name, event_id, data = read_event(response)
        assert name == "chunk"
        ids.append(int(event_id))
        text += json.loads(data)
    writer.write(b"second line\n")
    writer.flush()
    while "second line" not in text:
        name, event_id, data = read_event(response)
        assert name == "chunk"
        ids.append(int(event_id))
        text += json.loads(data)
    assert ids[-1] == len("first line\nsecond line\n")
    writer.write(b"third line\n")
    writer.close()
    attempt = (Attempt.select().join(Build).where(Build.uuid == uuid)
               .order_by(Attempt.id.desc()).get())
    records.succeed(attempt.id, [], farm.running_log)
    events = [read_event(response)]
    while events[-1][0] != "end":
        events.append(read_event(response))
    text += "".join(json.loads(d) for name, _, d in events if name == "chunk")
    assert text == "line\nsecond line\nthird line\n"
    connection.close()
    # Resumed with Last-Event-ID, after the build: what follows, then the end.
    connection = http.client.HTTPConnection(server.netloc, timeout=30)
    connection.request("GET", stream, headers={"Last-Event-ID": str(len("first line\n"))})
    response = connection.getresponse()
    first, second = read_event(response), read_event(response)
    assert first[0] == "chunk" and json.loads(first[2]) == "second line\nthird line\n"
    assert first[1] == str(len("first line\nsecond line\nthird line\n"))
    assert second[0] == "end"
    connection.close()


def test_pages_logs_and_log_streams_show_no_escape_sequences(
    server: WebServer, farm: Farm
) -> None:
    """A builder's colours, titles and bells, and a machine's message with them, are shown as
    plain text: on the page, in the whole log and in the live stream, even when the log's last
    flush ends inside a sequence (the stream resumes after it, not inside it)."""
    from buildfarm.datastore import attempts as records
    from buildfarm.datastore import open_datastore

    with open_datastore(farm.url):
        attempt = start_attempt("m1")  # the queued build (waiting-3)
        uuid = attempt.build.uuid
        log = str(farm.state / "logs" / f"{uuid}-{attempt.id}.log.gz")
        records.step(attempt.id, "build", log_path=log)
        writer = LogWriter(log)
        writer.write(b"\x1b]0;building\x07\x1b[1mbold\x1b[0m \x1b[3")  # cut inside "\x1b[31m"
        writer.flush()
        _, _, page = server.get(f"/builds/{uuid}")
        (pre,) = assert_safe(page).all("pre", id="log-text")
        assert pre["data-offset"] == str(len(b"\x1b]0;building\x07\x1b[1mbold\x1b[0m "))
        assert "bold \n" not in page and ">bold </pre>" in page
        connection = http.client.HTTPConnection(server.netloc, timeout=30)
        connection.request("GET", f"/builds/{uuid}/log/stream?offset={pre['data-offset']}")
        response = connection.getresponse()
        writer.write(b"1mred\x1b[0m\r\n\x08done\n")
        writer.close()
        records.fail(attempt.id, 1, "builder \x1b[31mfailed\x1b[0m\x07", log)
    events = [read_event(response)]
    while events[-1][0] != "end":
        events.append(read_event(response))
    connection.close()
    assert "".join(json.loads(d) for name, _, d in events if name == "chunk") == "red\ndone\n"
    status, _, text = server.get(f"/builds/{uuid}/log")
    assert status == 200 and text == "bold red\ndone\n"
    _, _, page = server.get(f"/builds/{uuid}")
    shown = "".join(assert_safe(page).text)
    assert "builder failed" in shown and "bold red\ndone\n" in shown
    assert not any(c in page for c in "\x1b\x07\x08\r")


def test_a_uuid_prefix_names_a_build_in_urls(server: WebServer, farm: Farm) -> None:
    leaf = farm.builds["leaf"]
    for path in (f"/builds/{leaf[:8]}", f"/api/builds/{leaf[:13]}", f"/builds/{leaf[:8]}/log"):
        status, _, body = server.get(path)
        assert status == 200, (path, body)
    assert server.json(f"/api/builds/{leaf[:8].upper()}")["uuid"] == leaf
    status, _, body = server.get("/api/builds/0000000000")
    assert status == 404 and json.loads(body)["error"] == (
        "no build's UUID starts with 00000000-00")
    assert server.get(f"/builds/{leaf[:7]}")[0] == 404


def read_event(response: http.client.HTTPResponse) -> tuple[str, str, str]:
    """(event name, id, data) of the next event on a log stream."""
    fields: dict[str, str] = {}
    while True:
        line = response.readline().decode()
        assert line, "the stream ended"
        line = line.rstrip("\n")
        if not line:
            if "event" in fields:
                return fields["event"], fields.get("id", ""), fields.get("data", "")
            fields = {}
            continue
        name, _, value = line.partition(": ")
        fields[name] = value


def test_static_assets_and_api_index(server: WebServer) -> None:
    from buildfarm.web import ENDPOINTS

    status, headers, script = server.get("/static/app.js")
    assert "EventSource" in script
    assert status == 200 and headers["Content-Type"].startswith("text/javascript")
    assert server.get("/static/app.js", {"If-None-Match": headers["ETag"]})[0] == 304
    assert server.get("/static/nothing.js")[0] == 404
    listed = server.json("/api")
    assert [e["path"] for e in listed] == [e.path for e in ENDPOINTS]
    for endpoint in ENDPOINTS:
        assert endpoint.description and endpoint.path.startswith(("/api", "/events"))


# -- the builds list (in this process, on the datastore directly) ---------------------------


@pytest.fixture
def listed(database: ScratchDatabase) -> Iterator[list[dict[str, Any]]]:
    """40 builds over two systems, three tags and three states; newest first."""
    from buildfarm.datastore import open_datastore
    from buildfarm.datastore.models import Build

    with open_datastore(database.url):
        for n in range(40):
            system = "aarch64-linux" if n % 4 == 0 else SYSTEM
            tags = (("batch", "odd" if n % 2 else "even"),) + ((("rare", "yes"),) if n == 3
                                                               else ())
            submit(make_drv(f"Pkg_{n}%-1.{n}", system=system), tags=tags)
        for n, build in enumerate(Build.select().order_by(Build.id)):
            state = "failed" if n % 5 == 0 else "succeeded" if n % 3 == 0 else "queued"
            Build.update(state=state).where(Build.id == build.id).execute()
        from buildfarm.datastore.builds import list_builds as plain

        yield plain(limit=1000)


def walk_pages(filters: Any, limit: int, **start: str) -> tuple[list[str], int]:
    """Every page of `filters` from the start, following older; (UUIDs, pages)."""
    from buildfarm.web.listing import list_builds

    uuids: list[str] = []
    pages = 0
    page = list_builds(filters, limit=limit, **start)
    while True:
        pages += 1
        uuids += [b["uuid"] for b in page["builds"]]
        if page["older"] is None:
            return uuids, pages
        page = list_builds(filters, limit=limit, after=page["older"])


FILTERS: tuple[dict[str, Any], ...] = (
    {},
    {"state": "queued"},
    {"system": "aarch64-linux"},
    {"tags": ["batch=odd"]},
    {"tags": ["batch=odd", "rare=yes"]},
    {"name": "pkg_1"},  # any case; _ is a character, not a wildcard
    {"name": "%-1.2"},
    {"state": "failed", "system": SYSTEM, "tags": ["batch=even"]},
    {"system": "mips-linux"},
)


@pytest.mark.parametrize("wanted", FILTERS, ids=lambda f: repr(f) or "none")
def test_builds_list_filters_and_pages_agree_with_a_plain_scan(
    listed: list[dict[str, Any]], wanted: dict[str, Any]
) -> None:
    from buildfarm.web.listing import Filters

    filters = Filters.parse(wanted.get("state"), wanted.get("system"), wanted.get("tags", []),
                            wanted.get("name"))

    def matches(b: dict[str, Any]) -> bool:
        name = wanted.get("name", "").lower()
        return (
            b["state"] == wanted.get("state", b["state"])
            and b["system"] == wanted.get("system", b["system"])
            and all(b["tags"].get(k) == v for k, _, v in
                    (t.partition("=") for t in wanted.get("tags", [])))
            and name in os.path.basename(b["derivation"]).lower()
        )

    expected = [b["uuid"] for b in listed if matches(b)]
    assert expected or wanted == {"system": "mips-linux"}
    got, pages = walk_pages(filters, limit=3)
    assert got == expected
    assert pages == max(1, -(-len(expected) // 3))


def test_builds_pages_keep_their_builds_while_new_ones_arrive(
    listed: list[dict[str, Any]]
) -> None:
    from buildfarm.web.listing import Filters, list_builds

    first = list_builds(Filters(), limit=10)
    second = list_builds(Filters(), limit=10, after=first["older"])
    assert [b["uuid"] for b in first["builds"] + second["builds"]] == [
        b["uuid"] for b in listed[:20]]
    assert first["newer"] is None and second["newer"] == second["builds"][0]["uuid"]
    submit(*(make_drv(f"late-{n}") for n in range(4)))
    again = list_builds(Filters(), limit=10, after=first["older"])
    assert again["builds"] == second["builds"]
    back = list_builds(Filters(), limit=10, before=second["newer"])
    assert back["builds"] == first["builds"] and back["newer"] is not None
    newest = list_builds(Filters(), limit=10, before=back["newer"])
    assert [b["name"] for b in newest["builds"]] == [f"late-{n}" for n in (3, 2, 1, 0)]
    assert newest["newer"] is None
    # A tag's pages, from a build that does not have the tag.
    odd = list_builds(Filters(tags=(("batch", "odd"),)), limit=5,
                      after=listed[0]["uuid"] if listed[0]["tags"]["batch"] == "even"
                      else listed[1]["uuid"])
    assert [b["tags"]["batch"] for b in odd["builds"]] == ["odd"] * 5


def test_a_filter_no_index_serves_searches_a_window_at_a_time(
    listed: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from buildfarm.web import listing

    monkeypatch.setattr(listing, "SCAN_WINDOW", 8)
    monkeypatch.setattr(listing, "FIRST_CHUNK", 2)
    monkeypatch.setattr(listing, "MAX_CHUNK", 4)
    filters = listing.Filters(name="pkg_3%")  # only the fourth build, near the oldest
    page = listing.list_builds(filters)
    assert page["builds"] == [] and page["searched"] == 8 and page["searched_to"]
    assert page["older"] == listed[7]["uuid"]
    found, windows = walk_pages(filters, limit=50)
    assert found == [b["uuid"] for b in listed if "Pkg_3%" in b["derivation"]]
    assert windows == 5  # 40 builds, 8 at a time
    assert listing.list_builds(filters, after=listed[-5]["uuid"])["searched"] is None


def test_bad_filters_are_usage_errors(listed: list[dict[str, Any]]) -> None:
    from buildfarm.errors import NotFoundError, UsageError
    from buildfarm.web.listing import Filters, list_builds

    with pytest.raises(UsageError, match="unknown state"):
        Filters.parse("sleeping", None, [], None)
    with pytest.raises(UsageError, match="bad tag"):
        Filters.parse(None, None, ["no equals sign"], None)
    with pytest.raises(UsageError, match="either"):
        list_builds(Filters(), after=listed[0]["uuid"], before=listed[1]["uuid"])
    with pytest.raises(NotFoundError):
        list_builds(Filters(), after="00000000-0000-0000-0000-000000000000")


def test_machine_errors_never_show_how_machines_are_reached(
    database: ScratchDatabase, tmp_path: Path, hosts: list[Any]
) -> None:
    """The coordinator's own message for each way a connection fails names the user, address,
    port, key file or known_hosts file (for the operator, at the terminal). As a machine's
    last error and an attempt's detail, the pages and the API show each as (hidden)."""
    import asyncio

    import yaml

    from buildfarm.datastore import attempts as records
    from buildfarm.datastore import open_datastore
    from buildfarm.datastore.models import MachineState
    from buildfarm.errors import RemoteError
    from buildfarm.inventory import Machine
    from buildfarm.ssh.connect import open_connection

    host = hosts[0]
    stranger = tmp_path / "stranger_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)],
                   check=True)
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    reach = {"host": host.address, "port": host.port, "user": host.user,
             "identity": str(host.client_key), "known_hosts": str(host.known_hosts)}
    machines = {
        "auth": {**reach, "identity": str(stranger)},
        "unknown-key": {**reach, "known_hosts": str(empty)},
        "refused": {**reach, "port": closed},
        "unresolvable": {**reach, "host": "no-such-host.invalid"},
    }

    def failure(name: str, fields: dict[str, Any]) -> str:
        try:
            asyncio.run(open_connection(Machine(name, **fields), lambda *_: None))
        except RemoteError as e:
            return str(e)
        raise AssertionError(f"{name} connected")

    messages = {name: failure(name, fields) for name, fields in machines.items()}
    assert "authentication failed for" in messages["auth"]
    assert str(stranger) in messages["auth"] and f"{host.user}@" in messages["auth"]
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(yaml.safe_dump({"machines": [
        {"name": name, **fields, "systems": [SYSTEM], "store": "guix"}
        for name, fields in machines.items()]}))
    with open_datastore(database.url):
        (uuid,) = submit(make_drv("reach-1.0"))
        for name, message in [*messages.items(), ("retired", messages["auth"])]:
            MachineState.create(name=name, last_error=message, failures=1,
                                updated_at=time.time())
        attempt = start_attempt("auth")
        records.interrupt(attempt.id, f"connection lost: {messages['auth']}")
    secrets = [host.address, str(stranger), str(empty), str(host.known_hosts),
               str(host.client_key), "no-such-host.invalid", f"{host.user}@",
               f":{host.port}", f":{closed}", f"-p {host.port}"]
    web = WebServer(server_env(tmp_path, database.url, str(inventory)))
    try:
        shown = ""
        for path in ("/", "/api/overview", "/machines", "/api/machines", "/machines/auth",
                     "/api/machines/auth", "/machines/retired", "/api/machines/retired",
                     f"/builds/{uuid}", f"/api/builds/{uuid}", "/machines/unresolvable"):
            status, _, body = web.get(path)
            assert status == 200, (path, body)
            for secret in secrets:
                assert secret not in body, (path, secret)
            shown += body
        for text in ("authentication failed for (hidden); is the public key of (hidden) in",
                     "connection refused by (hidden)", "cannot resolve host (hidden)",
                     "connection lost: auth: authentication failed for (hidden)"):
            assert text in shown, text
    finally:
        web.stop()
