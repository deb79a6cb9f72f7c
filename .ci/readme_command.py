"""Print the first ```bash block under a README.md heading, so CI runs the README's commands verbatim.

    python3 .ci/readme_command.py "Quick start"     # the heading's text up to its first "(", if any
    python3 .ci/readme_command.py Tests

Standard library only: CI calls it before anything is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path


def command(readme: str, heading: str) -> str:
    """The text of the first ```bash fence after the `## heading` line (heading matched by its prefix)."""
    lines = readme.splitlines()
    starts = [i for i, line in enumerate(lines)
              if line.startswith("## ") and line[3:].split("(")[0].strip() == heading]
    if not starts:
        raise SystemExit(f"README.md has no '## {heading}' section; CI runs the commands it shows")
    for i in range(starts[0] + 1, len(lines)):
        if lines[i].startswith("## "):
            break
        if lines[i].strip() == "```bash":
            end = lines.index("```", i + 1)
            return "\n".join(lines[i + 1:end]).strip()
    raise SystemExit(f"README.md's '## {heading}' section has no ```bash block")


if __name__ == "__main__":
    print(command(Path(__file__).resolve().parents[1].joinpath("README.md").read_text(), sys.argv[1]))
