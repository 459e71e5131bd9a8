"""MkDocs hooks: the CLI reference rendered from the parsers, and docstring roles made plain.

``on_page_markdown`` renders every ``kongtask`` command's ``--help`` into the CLI
reference page. The help comes from the argument parsers kongtask itself builds,
walked at build time (subcommands included), so the page cannot drift from the
installed CLI. A command group of ``kongtask.ops.cli.main.GROUPS`` this hook does not
know fails the build, naming it.

``on_page_content`` turns the Sphinx roles kongtask's docstrings use
(``:class:`~kongtask.errors.ConfigurationError```) into plain code
(``ConfigurationError``): mkdocstrings shows docstrings as Markdown and would
print the role.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

MARKER = "<!-- kongtask-cli-reference -->"
EVENTS_MARKER = "<!-- kongtask-events-reference -->"
EVENTS_PAGE = "reference/events.md"
#: A Sphinx role before inline code, as the docstrings' Markdown renders it.
ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>~?([^<]*)</code>")
PAGE = "reference/cli.md"


def _parsers() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """The parser factory of the worker command and of each command group."""
    from kongtask.ops.cli import admin, cron, crontab, jobs, limits, main
    from kongtask.ops.dashboard import cli as dashboard

    factories: dict[str, Callable[[], argparse.ArgumentParser]] = {
        "kongtask": main._worker_parser,
        "kongtask crontab": crontab._parser,
        "kongtask cron": cron._parser,
        "kongtask admin": admin._parser,
        "kongtask status": jobs._status_parser,
        "kongtask jobs": jobs._jobs_parser,
        "kongtask dashboard": dashboard._parser,
        "kongtask limits": limits._limits_parser,
        "kongtask pause": lambda: limits._pause_parser("pause"),
        "kongtask resume": lambda: limits._pause_parser("resume"),
        "kongtask pauses": lambda: limits._pause_parser("pauses"),
    }
    unknown = [group for group in main.GROUPS if f"kongtask {group}" not in factories]
    if unknown:
        raise RuntimeError(f"mkdocs_hooks: no parser for command group(s) {unknown}")
    return factories


def _walk(name: str, parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
    """``(command, help text)`` for the parser and, depth first, each subcommand."""
    yield name, parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from _walk(f"{name} {sub_name}", sub_parser)


def render() -> str:
    """The reference as Markdown: one section per command with its help."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; make the page stable
    try:
        sections = []
        for group, factory in _parsers().items():
            for command, text in _walk(group, factory()):
                sections.append(f"## `{command}`\n\n```text\n{text.rstrip()}\n```\n")
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return "\n".join(sections)


def render_events() -> str:
    """Every signal of ``kongtask.events`` as a list: its event name, its attribute, its doc."""
    from kongtask import events

    attributes = {
        value.name: name
        for name, value in vars(events).items()
        if not name.startswith("_") and getattr(value, "name", None) in events.namespace
    }
    rows = []
    for event in events.EVENT_NAMES:
        if event not in attributes:
            raise RuntimeError(f"mkdocs_hooks: event {event!r} has no attribute in kongtask.events")
        doc = " ".join((events.signal_for(event).__doc__ or "").split())
        rows.append(f"- `{event}` (`events.{attributes[event]}`): {doc}")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the markers on the CLI and events pages with what the code says."""
    for uri, marker, rendering in (
        (PAGE, MARKER, render),
        (EVENTS_PAGE, EVENTS_MARKER, render_events),
    ):
        if page.file.src_uri == uri:
            if marker not in markdown:
                raise RuntimeError(f"{uri} lost its marker {marker}")
            return markdown.replace(marker, rendering())
    return markdown


def _plain(match: re.Match[str]) -> str:
    target = match.group(1)
    short = target.rsplit(".", 1)[-1] if match.group(0).count("~") else target
    return f"<code>{short}</code>"


def on_page_content(html: str, **_: Any) -> str:
    """Drop the Sphinx roles (``:class:``, ``:func:`` ...) the docstrings' Markdown keeps."""
    return ROLE.sub(_plain, html)
