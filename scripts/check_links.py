#!/usr/bin/env python3
"""Check every relative link in the repository's Markdown documents.

    scripts/check_links.py [FILE.md ...]     (default: README.md, docs/*.md, crates/*/README.md)

A link is `[text](target)` or `[text]: target` outside code blocks and inline code.
External links (a scheme such as https:, or mailto:) are not fetched. For every other
target the file or directory must exist, relative to the document that links it; a
`#anchor` must name a heading of the target Markdown file (or of the document itself
for `#anchor` alone), with GitHub's slug rules: lower case, punctuation other than `-`
and `_` removed, spaces turned into `-`, a repeated heading's slug suffixed `-1`, `-2`.

Exit status: 0 when every link resolves; 1 when any does not (each broken link is
printed as FILE:LINE: target: why); 2 on bad usage (a named file that does not exist).
Standard library only.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INLINE = re.compile(r"\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+(<[^>]*>|\S+)")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def strip_inline_code(line):
    """The line with `code spans` blanked, so links inside them are not links."""
    return re.sub(r"(`+)(.+?)\1", lambda m: " " * len(m.group(0)), line)


def slug(text):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"`", "", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text, flags=re.UNICODE)
    return text.replace(" ", "-")


def anchors(path, cache={}):
    """Every heading anchor of a Markdown file."""
    if path in cache:
        return cache[path]
    seen = {}
    out = set()
    in_fence = False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if FENCE.match(line):
                in_fence = not in_fence
                continue
            if in_fence:
                continue
            m = HEADING.match(line)
            if not m:
                continue
            s = slug(m.group(2))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    # Explicit HTML anchors: <a name="x"> or id="x".
    with open(path, encoding="utf-8") as f:
        for m in re.finditer(r"<a\s+(?:name|id)=\"([^\"]+)\"", f.read()):
            out.add(m.group(1))
    cache[path] = out
    return out


def links(path):
    """(line number, target) of every link of a Markdown file, outside code."""
    in_fence = False
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if FENCE.match(line):
                in_fence = not in_fence
                continue
            if in_fence:
                continue
            m = REFDEF.match(line)
            if m:
                yield no, m.group(1).strip("<>")
                continue
            for m in INLINE.finditer(strip_inline_code(line)):
                yield no, m.group(1).strip("<>")


def check(path):
    """Broken links of one file, as printable lines."""
    bad = []
    rel = os.path.relpath(path, ROOT)
    for no, target in links(path):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        if file_part:
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if not os.path.exists(dest):
                bad.append(f"{rel}:{no}: {target}: no such file or directory")
                continue
        else:
            dest = path
        if anchor and dest.endswith(".md") and os.path.isfile(dest):
            if anchor not in anchors(dest):
                bad.append(f"{rel}:{no}: {target}: no heading with anchor #{anchor} in "
                           f"{os.path.relpath(dest, ROOT)}")
    return bad


def default_files():
    files = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(ROOT, "docs")
    files += sorted(os.path.join(docs, f) for f in os.listdir(docs) if f.endswith(".md"))
    crates = os.path.join(ROOT, "crates")
    for c in sorted(os.listdir(crates)):
        readme = os.path.join(crates, c, "README.md")
        if os.path.isfile(readme):
            files.append(readme)
    return files


def main(argv):
    files = [os.path.abspath(a) for a in argv] or default_files()
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        for f in missing:
            print(f"check_links: {f}: no such file", file=sys.stderr)
        return 2
    bad = []
    n = 0
    for f in files:
        n += sum(1 for _ in links(f))
        bad += check(f)
    for b in bad:
        print(b)
    if bad:
        print(f"check_links: {len(bad)} broken of {n} links in {len(files)} files", file=sys.stderr)
        return 1
    print(f"check_links: all {n} links in {len(files)} files resolve")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
