"""HTML parts as a reader sees them: :func:`render_html` gives the visible
text (scripts and styles dropped, block elements as line breaks, ``alt`` text
of images kept) and records the links (with the link text of ``<a>``) on the
message."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import TYPE_CHECKING

from mxguard.content.mime_uri import add_uris, normalize_uri, text_uris

if TYPE_CHECKING:
    from mxguard.content.mime import ParsedMessage

MAX_HTML = 1 << 20  # characters of one HTML part rendered

_BLOCK_TAGS = frozenset(("p", "div", "br", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
                         "table", "ul", "ol", "blockquote", "pre", "hr", "title", "dd", "dt",
                         "section", "article", "header", "footer", "form", "center"))
_SKIP_TAGS = frozenset(("script", "style", "noscript", "template"))
_URI_ATTRS = {"a": "href", "area": "href", "img": "src", "form": "action", "iframe": "src",
              "link": "href", "base": "href", "frame": "src", "embed": "src"}


class _HtmlText(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0
        self.uris: list[tuple[str, str, str]] = []  # (url, link text, tag)
        self.link: tuple[str, list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip += 1
        if tag in _BLOCK_TAGS:
            self.out.append("\n")
        attr = _URI_ATTRS.get(tag)
        if attr is None:
            return
        url = next((v for k, v in attrs if k == attr and v), "")
        if tag == "img":
            alt = next((v for k, v in attrs if k == "alt" and v), "")
            if alt:
                self.out.append(f" {alt} ")
        if not url:
            return
        if tag == "a":
            self._close_link()
            self.link = (url, [])
        else:
            self.uris.append((url, "", tag))

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS and self.skip:
            self.skip -= 1
        if tag == "a":
            self._close_link()
        if tag in _BLOCK_TAGS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        self.out.append(data)
        if self.link is not None:
            self.link[1].append(data)

    def _close_link(self) -> None:
        if self.link is not None:
            url, text = self.link
            self.uris.append((url, " ".join("".join(text).split()), "a"))
            self.link = None


def render_html(source: str, msg: ParsedMessage | None = None) -> str:
    """Visible text of an HTML document (links recorded on ``msg``)."""
    if len(source) > MAX_HTML:
        source = source[:MAX_HTML]
        if msg is not None:
            msg.problems.append(f"HTML part longer than {MAX_HTML} characters: rendered partially")
    parser = _HtmlText()
    try:
        parser.feed(source)
        parser.close()
    except Exception:
        if msg is not None:
            msg.problems.append("HTML could not be parsed to the end")
    parser._close_link()
    if msg is not None:
        found = [normalize_uri(url, text=text, tag=tag) for url, text, tag in parser.uris]
        add_uris(msg, [u for u in found if u is not None])
    text = "".join(parser.out)
    text = re.sub(r"[ \t\r\f\v\xa0]+", " ", text)
    text = re.sub(r" *\n[ \n]*", "\n", text).strip()
    if msg is not None:
        add_uris(msg, text_uris(text))
    return text


__all__ = ["MAX_HTML", "render_html"]
