"""The console's HTML: every value goes through `esc`, every page through `page`.

Plain string building, no template engine: a page is a few tables and
forms. Whatever came from the ledger or a request (a subject's id, a
workflow's name, an error) is escaped where it is put into the page, so a
subject named `<script>` shows as that text. Bars are inline SVG, not style
attributes, so the Content-Security-Policy can forbid inline styles and
scripts altogether.
"""

from __future__ import annotations

import html
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

from .auth import Identity


def esc(value: object) -> str:
    """Text for HTML (element content or a quoted attribute); None is empty."""
    return "" if value is None else html.escape(str(value), quote=True)


def url(path: str, **params: object) -> str:
    """A path with its query, empty parameters left out (escape it with `esc` where it goes into HTML)."""
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    return f"{path}?{query}" if query else path


def segment(value: str) -> str:
    """One path segment (a tenant or workflow id may hold any character)."""
    return quote(value, safe="")


def link(href: str, text: object) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def when(value: datetime | None) -> str:
    """A timestamp in UTC to the second."""
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def table(headers: Iterable[str], rows: Iterable[Iterable[str]], empty: str = "Nothing to show.") -> str:
    """A table of cells that are HTML already (escape what goes into them)."""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="empty">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def hidden(name: str, value: object) -> str:
    return f'<input type="hidden" name="{esc(name)}" value="{esc(value)}">'


def post_button(action: str, label: str, csrf: str, fields: dict[str, object] | None = None, danger=False) -> str:
    """A form that POSTs to `action` with the session's CSRF token (and `fields`) when its button is pressed."""
    inputs = hidden("csrf", csrf) + "".join(hidden(k, v) for k, v in (fields or {}).items())
    cls = ' class="danger"' if danger else ""
    return (
        f'<form class="inline" method="post" action="{esc(action)}">{inputs}'
        f'<button type="submit"{cls}>{esc(label)}</button></form>'
    )


def bar(start: float, width: float, kind: str = "") -> str:
    """A bar from `start` to `start + width`, both fractions of the whole (0..1), drawn to scale."""
    x = max(0.0, min(start, 1.0)) * 1000
    w = max(min(width, 1.0) * 1000, 2.0)  # an instant still shows
    return (
        f'<svg class="bar" viewBox="0 0 1000 10" preserveAspectRatio="none" role="img">'
        f'<rect class="{esc(kind)}" x="{x:.1f}" y="0" width="{w:.1f}" height="10"></rect></svg>'
    )


def page(title: str, body: str, identity: Identity | None = None, csrf: str = "", notice: str = "") -> str:
    """A whole page: the navigation (when logged in), the notice if any, then `body`."""
    nav = ""
    if identity is not None:
        scope = "all tenants" if identity.tenant is None else f"tenant {identity.tenant}"
        logout = post_button("/logout", "Log out", csrf) if csrf else ""
        nav = (
            '<nav><a href="/executions">Executions</a> <a href="/dead-letters">Dead letters</a>'
            ' <a href="/workflows">Workflows</a> <a href="/audit">Audit</a>'
            + (' <a href="/live">Live</a>' if identity.tenant is None else "")
            + f'<span class="who">{esc(identity.name)} ({esc(scope)}) {logout}</span></nav>'
        )
    note = f'<p class="notice">{esc(notice)}</p>' if notice else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · Ordo</title>"
        '<link rel="stylesheet" href="/static/console.css"></head>'
        f"<body>{nav}<main><h1>{esc(title)}</h1>{note}{body}</main></body></html>"
    )


def chart(values: list[float | None], label: str, unit: str = "", digits: int = 1) -> str:
    """A bar per interval, oldest left, scaled to the largest; the latest and the largest value in words."""
    known = [v for v in values if v is not None]
    top = max(known, default=0.0)
    bars = "".join(
        f'<rect x="{i * 10 + 1}" y="{100 - v / top * 100:.1f}" width="8" height="{v / top * 100:.1f}"></rect>'
        for i, v in enumerate(values)
        if v is not None and top > 0
    )
    latest = f"{known[-1]:.{digits}f}{unit}" if known else "-"
    most = f"{top:.{digits}f}{unit}" if known else "-"
    return (
        f'<figure class="chart"><figcaption>{esc(label)}: now {esc(latest)}, at most {esc(most)}</figcaption>'
        f'<svg viewBox="0 0 {max(len(values), 1) * 10} 100" preserveAspectRatio="none" role="img">{bars}</svg>'
        "</figure>"
    )
