#!/usr/bin/env bash
# Documentation checks (issue 24's acceptance), no build needed, Python standard library:
#   - every relative link (and #anchor) in README.md, docs/*.md and crates/*/README.md resolves;
#   - README.md stays a front door: at most 200 lines;
#   - docs/format.md's title names the format version the code writes (FORMAT_VERSION);
#   - no document narrates its own development (phrases such as "this session", "earlier
#     rounds"): documents describe the current system, history is in git.
# Exit status non-zero, naming the file and line, when any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0

echo "== links"
python3 scripts/check_links.py || fail=1

echo "== README.md length"
lines=$(wc -l <README.md)
if [ "$lines" -gt 200 ]; then
  echo "README.md: $lines lines, more than 200 (move detail into docs/)"
  fail=1
else
  echo "README.md: $lines lines"
fi

echo "== format version"
code=$(sed -n 's/^pub const FORMAT_VERSION: u16 = \([0-9]*\);.*/\1/p' crates/gradshard-format/src/lib.rs)
title=$(head -1 docs/format.md)
if [ -z "$code" ]; then
  echo "crates/gradshard-format/src/lib.rs: no FORMAT_VERSION constant found"
  fail=1
elif [ "$title" != "# gradshard on-disk format, version $code" ]; then
  echo "docs/format.md:1: title '$title' does not name version $code (FORMAT_VERSION)"
  fail=1
else
  echo "docs/format.md documents version $code"
fi

echo "== no development narrative"
# Case-insensitive; each phrase tells the history of the work rather than the system.
if grep -n -i -E 'this session|earlier session|previous session|(earlier|previous|later) rounds? of|an earlier round|not lent|no GPU was|a reviewer measured|perf-plan' \
  README.md docs/*.md crates/*/README.md; then
  echo "the lines above narrate development: state the current system instead"
  fail=1
else
  echo "none found"
fi

exit $fail
