"""Print one of the README's two Quickstart commands, so CI runs exactly what users run.

The README marks them with HTML comments: ``<!-- quickstart:demo -->`` and
``<!-- quickstart:tests -->``, each followed by a fenced ``bash`` block holding one command.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def readme_command(which: str, readme: Path = Path("README.md")) -> str:
    text = readme.read_text(encoding="utf-8")
    pattern = rf"<!-- quickstart:{re.escape(which)} -->\s*```bash\n(.*?)\n```"
    match = re.search(pattern, text, flags=re.S)
    if match is None:
        raise SystemExit(f"README.md has no '<!-- quickstart:{which} -->' command block")
    lines = [ln for ln in match.group(1).splitlines() if ln.strip()]
    if len(lines) != 1:
        raise SystemExit(
            f"quickstart:{which} must be exactly one command, found {len(lines)} lines"
        )
    return lines[0]


if __name__ == "__main__":
    print(readme_command(sys.argv[1]))
