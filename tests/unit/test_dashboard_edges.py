"""The dashboard's guards on what it echoes: redirect targets and the request log."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kongtask.ops.dashboard.app import same_origin_path
from kongtask.ops.dashboard.server import hide_token

DEFAULT = "/ops/"

# What a browser (WHATWG URL parser) makes of each, resolved against http://dash/.
REFUSED = [
    ("/\r\nSet-Cookie: x=1", "CR/LF: a second header"),
    ("/\nSet-Cookie: x=1", "LF alone ends a header for some clients"),
    ("/x\x00", "NUL"),
    ("/x\x7f", "DEL"),
    ("/\\evil.example/", "a backslash is a slash: //evil.example/"),
    ("\\/evil.example/", "the same, the other way round"),
    ("/x\\y", "a backslash anywhere"),
    ("/\t/evil.example/", "tabs are dropped: //evil.example/"),
    ("/\n/evil.example/", "newlines are dropped: //evil.example/"),
    ("//evil.example/", "another host"),
    ("///evil.example/", "another host"),
    ("https://evil.example/", "a scheme"),
    ("javascript:alert(1)", "a scheme"),
    ("evil.example", "not a path"),
    ("", "nothing"),
    (" /jobs", "leading space (stripped by browsers, refused here)"),
    ("/jobs x", "a space"),
    ("/caf\u00e9", "non-ASCII (a Location header is ASCII)"),
    ("/\u2028", "a Unicode line separator"),
    # Browsers keep these as same-origin paths, but a proxy or server in front
    # that decodes the path before redirecting would not.
    ("/%5Cevil.example", "decodes to /\\evil.example"),
    ("/%5cevil.example", "lower-case escape"),
    ("/%09/evil.example", "decodes to a tab"),
    ("/%0D%0ASet-Cookie:x=1", "decodes to CR/LF"),
    ("/%2F/evil.example", "decodes to //evil.example"),
    ("/%2f%2fevil.example", "decodes to ///evil.example"),
    ("/%252F/evil.example", "decodes twice to //evil.example"),
    ("/%E2%80%A8", "decodes to a Unicode line separator"),
    ("/%" + "25" * 9 + "2F", "a slash encoded 10 times: still decoding after 8 rounds"),
]

ACCEPTED = [
    "/",
    "/jobs",
    "/jobs?state=failed",
    "/jobs/12",
    "/ops/jobs?task=a%2Fb&state=ready&queue=x%5Cy",  # escapes in the query stay escaped
    "/jobs?next=//evil.example",  # a query cannot change the host
    "/%25",
    "/a%20b",
]


@pytest.mark.parametrize(("value", "why"), REFUSED, ids=[why for _, why in REFUSED])
def test_a_hostile_next_gives_the_default(value: str, why: str) -> None:
    assert same_origin_path(value, DEFAULT) == DEFAULT


@pytest.mark.parametrize("value", ACCEPTED)
def test_a_path_on_this_site_is_kept(value: str) -> None:
    assert same_origin_path(value, DEFAULT) == value


SECRET = "s3cret-token"


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        (
            '"GET /jobs?token=s3cret-token HTTP/1.1" 303 0',
            '"GET /jobs?token=*** HTTP/1.1" 303 0',
        ),
        (
            '"GET /jobs?state=failed&token=s3cret&queue=q HTTP/1.1" 303 0',
            '"GET /jobs?state=failed&token=***&queue=q HTTP/1.1" 303 0',
        ),
        ('"GET /?%74oken=guess HTTP/1.1" 303 0', '"GET /?%74oken=*** HTTP/1.1" 303 0'),
        ('"GET /?Token=guess&x=1 HTTP/1.1" 403 0', '"GET /?Token=***&x=1 HTTP/1.1" 403 0'),
        (
            "code 400, message Bad request syntax ('GET /?token=guess HTTP/1.1 junk')",
            "code 400, message Bad request syntax ('GET /?token=*** HTTP/1.1 junk')",
        ),
        ('"GET /x/s3cret-token HTTP/1.1" 404 0', '"GET /x/*** HTTP/1.1" 404 0'),
        ('"GET /jobs?tokens=a&task=token HTTP/1.1" 200 9', None),
        ('"GET /jobs?task=email HTTP/1.1" 200 9', None),
    ],
)
def test_the_request_log_hides_the_token(line: str, logged: str | None) -> None:
    assert hide_token(line, SECRET) == (line if logged is None else logged)


def test_the_command_names_the_extra_when_it_is_missing() -> None:
    # uvicorn unimportable, as on an install without kongtask[dashboard].
    code = (
        "import sys; sys.modules['uvicorn'] = None; "
        "from kongtask.ops.cli.main import main; sys.exit(main(['dashboard', '--help']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "pip install 'kongtask[dashboard]'" in result.stderr, result.stderr
    assert "uvicorn is missing" in result.stderr and "Traceback" not in result.stderr
