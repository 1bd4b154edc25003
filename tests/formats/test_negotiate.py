"""Choosing an answer's format: the `format` parameter, else Accept (appliance/formats)."""

from __future__ import annotations

import pytest

from appliance.errors import InvalidInput, NotAcceptable
from appliance.formats.negotiate import choose, is_plain

OFFERED = ["json", "xml", "csv", "html", "markdown"]


def pick(accept: str | None = None, asked: object = None) -> str:
    return choose(asked, accept, OFFERED, "model 'm' version 1")


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "json"),
        ("*/*", "json"),
        (" Application/JSON ", "json"),
        ("application/xml", "xml"),
        ("text/xml", "xml"),
        ("text/csv", "csv"),
        ("text/html", "html"),
        ("application/xhtml+xml", "html"),
        ("text/markdown", "markdown"),
        ("text/*", "csv"),  # the server's order among a wildcard's matches
        ("text/csv;q=0.4, text/html;q=0.8, */*;q=0.1", "html"),
        ("text/*;q=0.5, text/markdown", "markdown"),
        ("text/*, text/csv;q=0", "html"),  # q=0: not acceptable
        ("application/xml, */*", "xml"),  # named beats a wildcard at the same q
        ("*/*;q=0.5", "json"),
        ("image/png, */*;q=0.1", "json"),
        ("text/markdown; charset=utf-8; q=0.9, text/csv; q=0.8", "markdown"),
    ],
)
def test_accept(accept: str | None, expected: str) -> None:
    assert pick(accept) == expected


def test_the_parameter_wins_and_is_exact() -> None:
    assert pick("text/csv", "xml") == "xml"
    assert pick(None, " HTML ") == "html"
    with pytest.raises(NotAcceptable, match=r"unknown format 'yaml' .*available: json, xml, csv"):
        pick(None, "yaml")
    with pytest.raises(NotAcceptable, match=r"^format 'text' is not available for model 'm'"):
        pick(None, "text")  # a known format this model has no template for
    with pytest.raises(InvalidInput, match=r"parameters.format must be a string"):
        pick(None, ["xml"])


def test_nothing_acceptable_is_406_listing_the_formats() -> None:
    for accept in ("image/png", "text/plain", "application/json;q=0, text/csv;q=0"):
        with pytest.raises(NotAcceptable) as err:
            pick(accept)
        assert "json (application/json), xml (application/xml), csv (text/csv)" in err.value.message


@pytest.mark.parametrize(
    ("accept", "message"),
    [
        ("text", "Accept: 'text' is not a media range"),
        ("text/csv;q=2", "Accept: q='2' must be a number from 0 to 1"),
        ("text/csv;q=nan", "Accept: q='nan'"),
        ("/csv", "not a media range"),
    ],
)
def test_malformed_accept_is_400(accept: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        pick(accept)


def test_plain_accepts_skip_negotiation() -> None:
    assert is_plain(None) and is_plain("*/*") and is_plain("application/json")
    assert not is_plain("text/csv") and not is_plain("application/json, text/csv")
