#!/usr/bin/python3
"""The claim's fresh text: English prose of The Debian Administrator's Handbook.

Debian package `debian-handbook` 11.20220922 (bookworm/main; GPL-2.0+ or CC-BY-SA-3.0,
Raphaël Hertzog and Roland Mas) ships the book as HTML. This script keeps its prose: the
pages in reading order (the chain of "next" links from index.html), and in each page the
paragraphs, titles and list items; screen listings, program output and examples (<pre>)
are left out, since they are not prose. Paragraphs are separated by blank lines.

Why it is unseen: the proxies' training corpus (../shared/DATA.md) is Linux kernel
documentation, GCIDE dictionary entries, SpamAssassin ham email, State of the Union
1790-1989, Moby Dick and the TinyStories head; none of it is this book, and no
dictionary, tuning or earlier evaluation of this project read it.

Usage (standard library only):
  apt-get download debian-handbook=11.20220922 && dpkg -x debian-handbook_11.20220922_all.deb x
  python3 bench/fresh_text.py x/usr/share/doc/debian-handbook/html/en-US data/text/debian_handbook_en.txt
The output's SHA-256 is checked against FRESH_TEXT_SHA256 (printed either way).
"""

import hashlib
import html.parser
import re
import sys
from pathlib import Path

FRESH_TEXT_SHA256 = "017f66ba0d1a2cec0fa2e94f55537b12a71ba0043587625f72ca4311bb29edb4"

BLOCKS = {"p", "h1", "h2", "h3", "h4", "h5", "li", "dt", "dd", "td", "th", "div"}
SKIPPED = {"pre", "script", "style", "head"}
NAVIGATION = {"docnav", "toc", "index", "list-of-figures", "list-of-tables", "list-of-examples"}


class Prose(html.parser.HTMLParser):
    """Text of one page: a paragraph per block element that holds text (the pages are
    XHTML, so every element is closed and the stack of open ones stays balanced)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs, self.current = [], []
        self.open = []  # (tag, skipped) per open element
        self.next_page = None

    def skipping(self):
        return any(skipped for _, skipped in self.open)

    def flush(self):
        text = re.sub(r"\s+", " ", "".join(self.current)).strip()
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and attrs.get("rel") == "next":
            self.next_page = attrs.get("href")
        if tag in BLOCKS or tag == "br":
            self.flush()
        # Navigation bars, tables of contents, the book's index and the page banner
        # carry no prose.
        classes = set((attrs.get("class") or "").split())
        navigation = bool(classes & NAVIGATION) or attrs.get("id") == "banner"
        self.open.append((tag, tag in SKIPPED or navigation))

    def handle_endtag(self, tag):
        if tag in BLOCKS:
            self.flush()
        while self.open:
            opened, skipped = self.open.pop()
            if skipped:
                self.current = []
            if opened == tag:
                break

    def handle_data(self, data):
        if not self.skipping():
            self.current.append(data)


def pages_in_order(folder):
    page, seen = "index.html", set()
    while page and page not in seen:
        seen.add(page)
        parser = Prose()
        parser.feed((folder / page).read_text(encoding="utf-8"))
        parser.flush()
        yield page, parser.paragraphs
        page = parser.next_page.split("#")[0] if parser.next_page else None


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    if not (folder / "index.html").is_file():
        raise SystemExit(f"fresh_text: {folder} has no index.html (give the en-US html folder)")
    paragraphs, pages = [], 0
    for _, page in pages_in_order(folder):
        pages += 1
        paragraphs.extend(page)
    text = "\n\n".join(paragraphs) + "\n"
    out.write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode()).hexdigest()
    print(f"fresh_text: {pages} pages, {len(paragraphs)} paragraphs, {len(text)} characters -> {out}")
    print(f"fresh_text: sha256 {digest} ({'as expected' if digest == FRESH_TEXT_SHA256 else 'NOT the expected text'})")


if __name__ == "__main__":
    main()
