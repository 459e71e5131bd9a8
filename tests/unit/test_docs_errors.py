"""Every message kongtask raises or prints on purpose is on the troubleshooting page.

The templates are read from the code (``tests/error_messages.py``: every
``raise`` of a ``KongtaskError`` subclass and every ``parser.error``); each fixed
piece of each message must appear, word for word, in docs/troubleshooting.md.
"""

from __future__ import annotations

from pathlib import Path

from tests.error_messages import Template, collect, normalise

PAGE = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def test_the_collector_reads_every_raise_site() -> None:
    templates = collect()
    unread = [t.where for t in templates if t.text is None]
    assert not unread, f"cannot read the message raised at {unread}; make it a literal or f-string"
    # It finds the raise sites it should: a few known ones, of several classes.
    errors = {t.error for t in templates}
    assert {"ConfigurationError", "InvalidJobError", "MigrationError", "CrontabError"} <= errors
    assert {"TaskLoadError", "EmbeddedServerError", "KongtaskError", "usage error"} <= errors
    assert len(templates) > 150


def test_every_message_template_is_on_the_troubleshooting_page() -> None:
    page = normalise(PAGE.read_text(encoding="utf-8"))
    missing: list[Template] = [
        t
        for t in collect()
        if t.text is not None and any(normalise(f) not in page for f in t.fragments())
    ]
    assert not missing, "docs/troubleshooting.md lacks these messages:\n" + "\n".join(
        f"  {t.where} {t.error}: {t.text}" for t in missing
    )


def test_the_check_fails_for_a_message_not_on_the_page(tmp_path: Path) -> None:
    module = tmp_path / "kongtask" / "thing.py"
    module.parent.mkdir()
    module.write_text(
        "from kongtask.errors import ConfigurationError\n"
        "class OddError(ConfigurationError):\n    pass\n"
        "def check(value):\n"
        "    message = f'the frobnicator {value!r} is out of tune'\n"
        "    raise OddError(message)\n",
        encoding="utf-8",
    )
    (template,) = collect(module.parent)
    assert template.error == "OddError"
    assert template.text == "the frobnicator {…} is out of tune"
    page = normalise(PAGE.read_text(encoding="utf-8"))
    assert not all(normalise(f) in page for f in template.fragments())
