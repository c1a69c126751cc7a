"""HTML built so that escaping cannot be forgotten: text is escaped unless it is `Markup`.

Only this module makes `Markup` from outside text: `h()` escapes every child that is not already
Markup and every attribute value, and URLs are assembled by `url()` from quoted parts. A page is
a tree of `h()` calls, so a derivation name, tag, reason or log line can only ever end up as
text, never as markup or script. No template engine: the pages are small, and a function per
page keeps them typed and checked by mypy.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence

from buildfarm.render import plain

_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9-]*\Z")
VOID = frozenset({"br", "hr", "img", "input", "link", "meta"})
# SVG elements written empty: in HTML, only "/>" ends them (foreign elements are never void).
EMPTY_SVG = frozenset({"rect", "line", "path", "circle"})


class Markup(str):
    """A string that is already HTML (made only by this module)."""

    __slots__ = ()


def escape(value: object) -> Markup:
    """Text as HTML: &, <, >, " and ' replaced (safe in elements and quoted attributes), and
    no escape sequence or control character but newline and tab (render.plain): a page shows
    a log's or a machine's text, never its terminal codes."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape(plain(str(value)), quote=True))


def _children(children: Iterable[object], out: list[str]) -> None:
    for child in children:
        if child is None or child is False or child is True:
            continue
        if isinstance(child, str | int | float):
            out.append(escape(child))
        else:
            _children(child, out)  # type: ignore[arg-type]  # an iterable of children


def _attributes(attrs: Mapping[str, object]) -> str:
    parts = []
    for name, value in attrs.items():
        name = name.rstrip("_").replace("_", "-")  # class_ -> class, data_x -> data-x
        if not _NAME.match(name):
            raise ValueError(f"bad attribute name {name!r}")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(f" {name}")
        else:
            parts.append(f' {name}="{escape(value)}"')
    return "".join(parts)


def h(tag: str, attrs: Mapping[str, object] | None = None, *children: object) -> Markup:
    """One element: <tag attrs>children</tag>, every text escaped."""
    if not _NAME.match(tag):
        raise ValueError(f"bad tag name {tag!r}")
    if tag in EMPTY_SVG and not children:
        return Markup(f"<{tag}{_attributes(attrs or {})}/>")
    opening = f"<{tag}{_attributes(attrs or {})}>"
    if tag in VOID and not children:
        return Markup(opening)
    out: list[str] = [opening]
    _children(children, out)
    out.append(f"</{tag}>")
    return Markup("".join(out))


def join(*children: object) -> Markup:
    """Several children side by side (escaped like h()'s)."""
    out: list[str] = []
    _children(children, out)
    return Markup("".join(out))


def url(path: Sequence[str] | str, query: Iterable[tuple[str, str]] | None = None) -> str:
    """/a/b?k=v from path segments (each percent-quoted) and query pairs (urlencoded).

    A string path is taken as already safe (a constant of the application)."""
    if isinstance(path, str):
        text = path
    else:
        text = "/" + "/".join(urllib.parse.quote(part, safe="") for part in path)
    pairs = [(k, v) for k, v in (query or ()) if v not in ("", None)]
    if pairs:
        text += "?" + urllib.parse.urlencode(pairs)
    return text


def document(title: str, body: object, *, nav: str = "", refresh: str | None = None) -> Markup:
    """A whole page: head with the stylesheet and script (no inline script or style: the
    Content-Security-Policy forbids them), the navigation, and `body` inside <main>."""
    links = (("/", "Overview", "overview"), ("/builds", "Builds", "builds"),
             ("/machines", "Machines", "machines"), ("/api", "API", "api"))
    head = h(
        "head", None,
        h("meta", {"charset": "utf-8"}),
        h("meta", {"name": "viewport", "content": "width=device-width, initial-scale=1"}),
        h("title", None, f"{title} — buildfarm"),
        h("link", {"rel": "stylesheet", "href": "/static/style.css"}),
        h("script", {"src": "/static/app.js", "defer": True}),
    )
    header = h(
        "header", None,
        h("a", {"class": "brand", "href": "/"}, "buildfarm"),
        h("nav", None, [
            h("a", {"href": href, "aria-current": "page" if key == nav else None}, label)
            for href, label, key in links
        ]),
    )
    main = h("main", {"id": "main", "data-refresh": refresh}, body)
    page = h("html", {"lang": "en"}, head, h("body", None, header, main))
    return Markup("<!DOCTYPE html>\n" + page + "\n")
