"""The pages: one function per page, from the same data the JSON API serves, to HTML.

Everything goes through html.h(), which escapes every string; parts of a page that change while
the farm runs are marked data-live (with an id) so that the script can swap them in place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from buildfarm.datastore.models import BUILD_STATES

from .html import Markup, document, h, join, url

RESULT_WORDS = {"success": "succeeded", "failure": "failed"}  # an attempt's, as a build's


# -- small pieces --------------------------------------------------------------------------


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(max(0.0, seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    if seconds < 10 and seconds != whole:
        return f"{seconds:.1f}s"
    return f"{secs}s"


def _epoch(moment: str | None) -> float | None:
    return datetime.fromisoformat(moment).timestamp() if moment else None


def when(moment: str | None, now: float | None = None) -> Markup:
    """<time> with the ISO date as its value and title, "5m ago" as its text."""
    if not moment:
        return Markup("-")
    stamp = _epoch(moment) or 0.0
    ago = (time.time() if now is None else now) - stamp
    text = f"{duration(ago)} ago" if 0 <= ago < 7 * 86400 else moment.replace("T", " ")[:16]
    if ago < 0:
        text = "in " + duration(-ago)
    return h("time", {"datetime": moment, "title": moment}, text)


def badge(state: str | None) -> Markup:
    if not state:
        return h("span", {"class": "state"}, "none")
    return h("span", {"class": f"state state-{state}", "data-state": state}, state)


def build_link(uuid: str | None, text: str, **attrs: Any) -> Markup:
    if uuid is None:
        return h("span", {"class": "path"}, text)
    return h("a", {"href": url(["builds", uuid]), **attrs}, text)


def machine_link(name: str | None) -> Markup:
    if not name:
        return Markup("-")
    return h("a", {"href": url(["machines", name])}, name)


def tag_links(tags: Mapping[str, str]) -> Markup:
    return join(
        h("a", {"class": "tag", "href": url("/builds", [("tag", f"{k}={v}")])}, f"{k}={v}")
        for k, v in tags.items()
    )


def table(headers: Sequence[str | tuple[str, str]], rows: Sequence[Markup],
          empty: str, **attrs: Any) -> Markup:
    if not rows:
        return h("p", {"class": "muted", **attrs}, empty)
    head = h("tr", None, [
        h("th", {"class": c[1]} if isinstance(c, tuple) else None,
          c[0] if isinstance(c, tuple) else c)
        for c in headers
    ])
    return h("table", attrs, h("thead", None, head), h("tbody", None, rows))


def slots_meter(busy: int, slots: int) -> Markup:
    cells = [h("span", {"class": "slot busy" if i < busy else "slot"}) for i in
             range(max(slots, busy))]
    return join(h("span", {"class": "slots", "title": f"{busy} of {slots} slots busy"}, cells),
                f" {busy}/{slots}")


# -- overview ------------------------------------------------------------------------------


def machines_table(machines: Sequence[Mapping[str, Any]], **attrs: Any) -> Markup:
    rows = [
        h("tr", {"data-machine": m["name"]},
          h("td", None, machine_link(m["name"])),
          h("td", None, badge(m["state"])),
          h("td", {"class": "path"}, " ".join(m["systems"]) or "-"),
          h("td", None, slots_meter(m["busy"], m["slots"])),
          h("td", {"class": "path"}, m["last_error"] or ""))
        for m in machines
    ]
    return table(("Machine", "State", "Systems", "Slots", "Last error"), rows,
                 "No machines: no inventory, and nothing recorded yet.", **attrs)


def running_table(running: Sequence[Mapping[str, Any]]) -> Markup:
    rows = [
        h("tr", {"data-uuid": a["build"]},
          h("td", None, build_link(a["build"], a["name"], class_="path")),
          h("td", None, a["system"]),
          h("td", None, machine_link(a["machine"])),
          h("td", None, a["step"],
            " " if a.get("step_started") else "",
            h("span", {"class": "muted", "data-since": a.get("step_started")},
              duration(time.time() - a["step_started"])) if a.get("step_started") else None),
          h("td", {"class": "num"},
            h("span", {"data-since": a["started"]}, duration(time.time() - a["started"]))))
        for a in running
    ]
    return table(("Build", "System", "Machine", "Step", ("Elapsed", "num")), rows,
                 "Nothing is running.")


def results_table(results: Sequence[Mapping[str, Any]]) -> Markup:
    rows = [
        h("tr", {"data-uuid": a["build"], "data-result": a["result"]},
          h("td", None, build_link(a["build"], a["name"], class_="path")),
          h("td", None, badge(RESULT_WORDS.get(a["result"], a["result"]))),
          h("td", None, a["system"]),
          h("td", None, machine_link(a["machine"])),
          h("td", None, when(a["ended_at"])),
          h("td", {"class": "num"}, duration(a["duration"])))
        for a in results
    ]
    return table(("Build", "Result", "System", "Machine", "Ended", ("Took", "num")), rows,
                 "No build has ended yet.")


def chart(hours: Sequence[Mapping[str, Any]]) -> Markup:
    """Builds that ended per hour as an SVG bar chart: succeeded below, failed on top. Each
    build is counted once, when it ended; the attempts that ended in the hour (a build may
    take several: setup failures, interruptions) are counted apart, in each hour's title."""
    width, height, top = 480.0, 90.0, 8.0
    bar = width / max(1, len(hours))
    peak = max((b["succeeded"] + b["failed"] for b in hours), default=0) or 1
    scale = (height - top - 14) / peak
    shapes: list[Markup] = [
        h("line", {"class": "axis", "x1": 0, "x2": width, "y1": height - 14, "y2": height - 14})
    ]
    total = 0
    for i, b in enumerate(hours):
        ok, bad = b["succeeded"], b["failed"]
        total += ok + bad
        x = i * bar + 1
        base = height - 14
        group = [h("title", None, hour_title(b))]
        if ok:
            group.append(h("rect", {"class": "ok", "x": f"{x:.1f}", "y": f"{base - ok * scale:.1f}",
                                    "width": f"{bar - 2:.1f}", "height": f"{ok * scale:.1f}"}))
        if bad:
            y = base - (ok + bad) * scale
            group.append(h("rect", {"class": "bad", "x": f"{x:.1f}", "y": f"{y:.1f}",
                                    "width": f"{bar - 2:.1f}", "height": f"{bad * scale:.1f}"}))
        if not ok and not bad:
            group.append(h("rect", {"x": f"{x:.1f}", "y": f"{base - 1:.1f}",
                                    "width": f"{bar - 2:.1f}", "height": "1",
                                    "class": "axis"}))
        shapes.append(h("g", {"data-hour": b["hour"]}, group))
        if i % 6 == 0:
            shapes.append(h("text", {"x": f"{x:.1f}", "y": f"{height - 3:.1f}"},
                            b["hour"][11:16]))
    shapes.append(h("text", {"x": 2, "y": top}, f"peak {peak} builds/h"))
    return h("svg", {"class": "chart", "viewBox": f"0 0 {width:g} {height:g}", "role": "img",
                     "aria-label": f"builds that ended per hour over the last day: {total}"},
             shapes)


def hour_title(b: Mapping[str, Any]) -> str:
    """e.g. "2025-01-01 14h: builds 120 succeeded, 7 failed; attempts 300 (setup failures
    170, interrupted 3)"."""
    text = f"{b['hour'][:13].replace('T', ' ')}h: builds {b['succeeded']} succeeded, " \
           f"{b['failed']} failed"
    if b["canceled"]:
        text += f", {b['canceled']} canceled"
    others = [f"{words} {b[key]}" for key, words in
              (("setup_failures", "setup failures"), ("interrupted", "interrupted")) if b[key]]
    text += f"; attempts {b['attempts']}"
    return text + (f" ({', '.join(others)})" if others else "")


def overview_page(data: Mapping[str, Any]) -> Markup:
    queue_rows = [
        h("tr", None,
          h("td", None, h("a", {"href": url("/builds", [("state", "queued"),
                                                          ("system", q["system"])])},
                          q["system"])),
          h("td", {"class": "num"}, f"{q['queued']:,}"),
          h("td", {"class": "num"}, f"{q['ready']:,}"))
        for q in data["queue"]
    ]
    queued = sum(q["queued"] for q in data["queue"])
    summary = h("p", {"id": "summary", "data-live": True, "class": "muted"},
                f"{len(data['running'])} running, {queued:,} queued — as of ",
                when(data["generated_at"]))
    body = join(
        h("h1", None, "Overview"),
        summary,
        h("div", {"class": "grid"},
          h("section", {"id": "queue", "data-live": True},
            h("h2", None, "Queue"),
            table(("System", ("Queued", "num"), ("Ready", "num")), queue_rows,
                  "The queue is empty.")),
          h("section", {"id": "machines", "data-live": True},
            h("h2", None, "Machines"), machines_table(data["machines"]))),
        h("section", {"id": "running", "data-live": True},
          h("h2", None, "Running"), running_table(data["running"])),
        h("section", {"id": "recent", "data-live": True},
          h("h2", None, "Recent results"), results_table(data["recent"])),
        h("section", {"id": "per-hour", "data-live": True},
          h("h2", None, "Builds that ended per hour, last 24 hours"), chart(data["per_hour"])),
    )
    return document("Overview", body, nav="overview", refresh="5")


# -- builds --------------------------------------------------------------------------------


def filter_form(filters: Mapping[str, Any], systems: Sequence[str]) -> Markup:
    state = filters.get("state")
    options = [h("option", {"value": ""}, "any")] + [
        h("option", {"value": s, "selected": s == state}, s) for s in BUILD_STATES
    ]
    tags = [f"{k}={v}" for k, v in filters.get("tags", [])] + [""]
    return h(
        "form", {"class": "filters", "method": "get", "action": "/builds", "id": "filters"},
        h("label", None, "State", h("select", {"name": "state"}, options)),
        h("label", None, "System",
          h("input", {"name": "system", "value": filters.get("system") or "",
                      "list": "systems", "placeholder": "x86_64-linux"})),
        h("datalist", {"id": "systems"}, [h("option", {"value": s}) for s in systems]),
        [h("label", None, "Tag", h("input", {"name": "tag", "value": t,
                                             "placeholder": "KEY=VALUE"})) for t in tags],
        h("label", None, "Derivation name",
          h("input", {"name": "name", "value": filters.get("name") or "",
                      "placeholder": "hello"})),
        h("button", {"type": "submit"}, "Filter"),
        h("a", {"href": "/builds"}, "clear"),
    )


def builds_table(builds: Sequence[Mapping[str, Any]]) -> Markup:
    rows = [
        h("tr", {"data-uuid": b["uuid"], "data-state": b["state"]},
          h("td", None, badge(b["state"])),
          h("td", None, build_link(b["uuid"], b["name"], class_="path", title=b["derivation"])),
          h("td", None, b["system"]),
          h("td", None, tag_links(b["tags"])),
          h("td", None, when(b["created_at"])),
          h("td", None, when(b["ended_at"])))
        for b in builds
    ]
    return table(("State", "Derivation", "System", "Tags", "Submitted", "Ended"), rows,
                 "No builds match.", id="build-list")


def builds_page(data: Mapping[str, Any], systems: Sequence[str]) -> Markup:
    filters = data["filters"]
    query = data["query"]
    pager = []
    if data.get("newer"):
        pager.append(h("a", {"href": url("/builds", [*query, ("before", data["newer"])]),
                             "rel": "prev"}, "← Newer"))
    if data.get("newer") or data.get("cursor"):
        pager.append(h("a", {"href": url("/builds", query)}, "Newest"))
    if data.get("older"):
        pager.append(h("a", {"href": url("/builds", [*query, ("after", data["older"])]),
                             "rel": "next"}, "Older →"))
    notice = None
    if data.get("searched_to"):
        notice = h("p", {"class": "notice"},
                   f"Searched {data['searched']:,} builds (back to ", when(data["searched_to"]),
                   "): the derivation name filter reads the builds a window at a time. ",
                   h("a", {"href": url("/builds", [*query, ("after", data["older"])])},
                     "Search older builds →") if data.get("older") else None)
    body = join(
        h("h1", None, "Builds"),
        filter_form(filters, systems),
        notice,
        builds_table(data["builds"]),
        h("nav", {"class": "pager"}, pager),
    )
    return document("Builds", body, nav="builds")


# -- one build -----------------------------------------------------------------------------


def _fields(pairs: Sequence[tuple[str, object]]) -> Markup:
    return h("dl", {"class": "fields"},
             [join(h("dt", None, k), h("dd", None, v)) for k, v in pairs if v not in (None, "")])


def _derivation_rows(items: Sequence[Mapping[str, Any]], outputs: bool) -> list[Markup]:
    return [
        h("tr", {"data-uuid": i["build"]},
          h("td", None, badge(i["state"])),
          h("td", None, build_link(i["build"], i["name"], class_="path", title=i["derivation"])),
          h("td", {"class": "path"}, " ".join(i["outputs"])) if outputs else None)
        for i in items
    ]


def attempt_section(number: int, a: Mapping[str, Any]) -> Markup:
    steps = [
        h("tr", None,
          h("td", None, s["name"]),
          h("td", None, when(s["started_at"])),
          h("td", {"class": "num"},
            duration(s["duration"]) if s["ended_at"] else
            h("span", {"data-since": s["started"]}, duration(time.time() - s["started"]))),
          h("td", {"class": "path"}, s["detail"] or ""))
        for s in a["steps"]
    ]
    missing = [
        h("li", {"class": "path"},
          m["path"],
          join(" — made by ", build_link(m.get("build"), m.get("derivation") or "", class_="path"),
               " ", badge(m.get("state"))) if m.get("derivation") else None)
        for m in a["missing_inputs"]
    ]
    result = a["result"] or "running"
    return h(
        "section", {"class": "attempt", "id": f"attempt-{a['id']}"},
        h("h3", None, f"Attempt {number} ", badge(result)),
        _fields([
            ("Machine", machine_link(a["machine"])),
            ("Started", when(a["started_at"])),
            ("Ended", when(a["ended_at"]) if a["ended_at"] else None),
            ("Took", duration(a["duration"]) if a["duration"] is not None else
             h("span", {"data-since": a["started"]}, duration(time.time() - a["started"]))),
            ("Step", a["step"] if a["result"] is None else None),
            ("Exit status", str(a["exit_status"]) if a["exit_status"] is not None else None),
            ("Detail", a["detail"]),
            ("Setup failure", a["setup_failure"]),
            ("Rebuilt with --check", a["check"]),
        ]),
        h("h4", None, "Missing inputs") if missing else None,
        h("ul", {"class": "missing"}, missing) if missing else None,
        _input_sources(a["input_sources"]),
        table(("Step", "Started", ("Took", "num"), "Detail"), steps, "No steps recorded."),
    )


_SOURCE_WORDS = {"machine": "already on the machine", "pushed": "pushed by the coordinator"}


def _input_sources(sources: Sequence[Mapping[str, str]]) -> Markup | None:
    """Where the attempt's inputs came from: a line per source, then each input's."""
    if not sources:
        return None
    counts: dict[str, int] = {}
    for item in sources:
        counts[item["source"]] = counts.get(item["source"], 0) + 1
    summary = "; ".join(
        f"{n} {_SOURCE_WORDS.get(source, f'downloaded from {source}')}"
        for source, n in counts.items())
    rows = [h("tr", None, h("td", {"class": "path"}, item["path"]),
              h("td", None, _SOURCE_WORDS.get(item["source"], item["source"])))
            for item in sources]
    return h("details", {"class": "inputs"},
             h("summary", None, f"Inputs: {summary}"),
             table(("Input", "From"), rows, ""))


def build_page(data: Mapping[str, Any], log: Mapping[str, Any] | None,
               no_log: str) -> Markup:
    uuid = data["uuid"]
    summary = h(
        "section", {"id": "summary", "data-live": True},
        h("p", None, badge(data["state"]), " ", data["reason"] or ""),
        _fields([
            ("UUID", uuid),
            ("Waiting", data["waiting"]["summary"] if data["waiting"] else None),
            ("Flaky", f"yes: it succeeded after {data['builder_failures']} builder failure(s)"
             if data["flaky"] else None),
            ("Root cause", join(build_link(data["cause"]["build"], data["cause"]["derivation"],
                                           class_="path"), " (its failure blocks this build)")
             if data["cause"] else None),
            ("Reproducible", {True: "yes: a rebuild gave identical outputs",
                              False: "no: a rebuild gave different outputs",
                              None: None}[data["reproducible"]]),
            ("Derivation", h("span", {"class": "path"}, data["derivation"])),
            ("System", data["system"]),
            ("Features", " ".join(data["required_features"])),
            ("Machine tags", " ".join(f"{k}={v}" for k, v in data["machine_tags"].items())
             or None),
            ("Priority", str(data["priority"])),
            ("Tags", tag_links(data["tags"]) if data["tags"] else None),
            ("Submitted", when(data["created_at"])),
            ("Deferred until", when(data["defer_until"]) if data["defer_until"] else None),
            ("Started", when(data["started_at"]) if data["started_at"] else None),
            ("Ended", when(data["ended_at"]) if data["ended_at"] else None),
        ]),
    )
    outputs = h("dl", {"class": "fields path"},
                [join(h("dt", None, name), h("dd", None, path))
                 for name, path in data["outputs"].items()])
    more = data["dependant_count"] - len(data["dependants"])
    counted = data["dependants_counted_up_to"]
    dependants_note = None
    if more > 0:
        total = f"{counted:,} or more" if data["dependant_count"] >= counted else \
            f"{data['dependant_count']:,}"
        dependants_note = h("p", {"class": "muted"},
                            f"The newest {len(data['dependants'])} of {total} dependants.")
    attempts = [attempt_section(n, a) for n, a in enumerate(data["attempts"], 1)]
    others = [
        h("li", None, build_link(o["build"], o["build"], class_="path"), " ", badge(o["state"]),
          " ", when(o["created_at"]))
        for o in data["other_builds"]
    ]
    body = join(
        h("h1", {"class": "path"}, data["name"]),
        summary,
        h("h2", None, "Outputs"), outputs,
        h("div", {"class": "grid"},
          h("section", {"id": "inputs", "data-live": True},
            h("h2", None, f"Inputs ({len(data['inputs'])})"),
            table(("State", "Derivation", "Outputs"), _derivation_rows(data["inputs"], True),
                  "No input derivations.")),
          h("section", {"id": "dependants", "data-live": True},
            h("h2", None, f"Dependants ({data['dependant_count']:,})"),
            dependants_note,
            table(("State", "Derivation"), _derivation_rows(data["dependants"], False),
                  "Nothing depends on this derivation."))),
        h("section", {"id": "other-builds"},
          h("h2", None, "Other builds of this derivation"),
          h("ul", None, others)) if others else None,
        h("section", {"id": "attempts", "data-live": True},
          h("h2", None, f"Attempts ({len(attempts)})"),
          attempts or h("p", {"class": "muted"}, "Not tried yet.")),
        log_section(uuid, log, no_log),
    )
    return document(data["name"], body, refresh="5" if data["state"] in ("queued", "running")
                    else None)


def log_section(uuid: str, log: Mapping[str, Any] | None, no_log: str) -> Markup:
    """The log's tail, or why there is none (`no_log`). While no attempt writes one, the
    section is refreshed with the page, so that it turns into a live tail when one starts; a
    live tail is then left to its stream."""
    if log is None:
        return h("section", {"id": "log", "data-live": True}, h("h2", None, "Log"),
                 h("p", {"class": "muted"}, no_log))
    cut = log["size"] - log["shown"]
    note = f"The last {log['shown']:,} of {log['size']:,} bytes. " if cut > 0 else ""
    stream = url(["builds", uuid, "log", "stream"]) if log["running"] else None
    return h(
        "section", {"id": "log", "data-live": not log["running"]},
        h("h2", None, "Log", h("span", {"class": "live"}, " (live)") if log["running"] else None),
        h("p", {"class": "muted"}, note,
          h("a", {"href": url(["builds", uuid, "log"])}, "Full log")),
        h("pre", {"class": "log", "id": "log-text", "data-log-stream": stream,
                  "data-offset": log["offset"]}, log["text"]),
    )


# -- machines ------------------------------------------------------------------------------


def machines_page(machines: Sequence[Mapping[str, Any]]) -> Markup:
    body = join(h("h1", None, "Machines"),
                h("section", {"id": "machine-list", "data-live": True},
                  machines_table(machines)))
    return document("Machines", body, nav="machines", refresh="5")


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f} %"


def machine_page(data: Mapping[str, Any]) -> Markup:
    attempts = [
        h("tr", {"data-uuid": a["build"]},
          h("td", None, build_link(a["build"], a["name"], class_="path")),
          h("td", None, badge(a["result"] or "running")),
          h("td", None, a["system"]),
          h("td", None, when(a["started_at"])),
          h("td", {"class": "num"}, duration(a["duration"]) if a["duration"] is not None else
            h("span", {"data-since": a["started"]}, duration(time.time() - a["started"]))))
        for a in data["attempts"]
    ]
    counts = data["results"]
    status = h(
        "section", {"id": "status", "data-live": True},
        h("p", None, badge(data["state"]),
          None if data["in_inventory"] else " (not in the inventory)"),
        _fields([
            ("Systems", " ".join(data["systems"]) or "-"),
            ("Features", " ".join(data["features"])),
            ("Tags", " ".join(f"{k}={v}" for k, v in data["tags"].items()) or None),
            ("Slots", slots_meter(data["busy"], data["slots"])),
            ("Store", data["store"]),
            ("Speed", str(data["speed"]) if data["speed"] is not None else None),
            ("Last error", data["last_error"]),
            ("Backing off until", when(data["backoff_until"]) if data["backoff_until"] else None),
            ("Failures in a row", str(data["failures"]) if data["failures"] else None),
            ("Success rate", f"{_percent(data['success_rate'])} of the {data['finished']:,} "
                             "builds it finished (succeeded or failed)"),
            ("Recently", f"{_percent(data['recent_success_rate'])} of the last "
                         f"{data['recent_window']} builds it finished"),
            ("Setup failures", f"{counts['setup-failure']:,} (inputs missing, or outputs it "
                               "could not delete: the build went back to the queue; not "
                               "counted against the machine)"),
            ("Interrupted", f"{counts['interrupted']:,} attempts"),
            ("Attempts", f"{sum(counts.values()):,}"),
        ]),
    )
    body = join(
        h("h1", None, data["name"]),
        status,
        h("section", {"id": "machine-attempts", "data-live": True},
          h("h2", None, "Recent attempts"),
          table(("Build", "Result", "System", "Started", ("Took", "num")), attempts,
                "No attempts yet.")),
    )
    return document(data["name"], body, nav="machines", refresh="5")


# -- API index and errors ------------------------------------------------------------------


def api_page(endpoints: Sequence[Any]) -> Markup:
    rows = [
        h("tr", None, h("td", {"class": "path"}, e.method), h("td", {"class": "path"}, e.path),
          h("td", None, e.description))
        for e in endpoints
    ]
    body = join(
        h("h1", None, "API"),
        h("p", None, "Every page has a JSON twin under /api; /events streams build events "
                     "(server-sent events). Also in the man page buildfarm-web(7)."),
        table(("Method", "Path", "What"), rows, ""),
    )
    return document("API", body, nav="api")


def error_page(status: int, message: str) -> Markup:
    return document(f"{status}", join(h("h1", None, f"{status}"), h("p", None, message)))
