"""Keep the install's locks exact and hashed: one line per package, `name==version --hash=sha256:...`, sorted.

infra/install.sh installs the pipeline's .venv from requirements/constraints.txt (and the converter environments
from requirements/litert-converter.txt and tf-converter.txt) with `pip install --require-hashes`, so every file it
installs is the one that was locked. pyproject.toml's extras keep ranges, for whoever embeds `edgeship[device]`.

    .venv/bin/python infra/lock.py             # add the hash of every line that lacks one (after adding `name==1.2.3`)
    .venv/bin/python infra/lock.py --check     # exit 1 if a line is unhashed, unsorted or not `name==version`
    .venv/bin/python infra/lock.py --freeze    # rewrite constraints.txt from what .venv holds now (after a pip install)
    .venv/bin/python infra/lock.py --refresh   # recompute every hash

The hash is that of the file pip picks here (from the index, or the local wheels pip is configured with, such as the
CPU build of torch): the project's machines (Linux x86_64, CPython 3.11). pip finds it without downloading wheels
(`pip install --dry-run --report`); about 45 s for the 280 lines of constraints.txt. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = [ROOT / "requirements" / name for name in ("constraints.txt", "litert-converter.txt", "tf-converter.txt")]
LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;]+)(?P<hashes>( --hash=sha256:[0-9a-f]{64})*)$")


def normalized(name: str) -> str:
    """PEP 503: the name pip compares (case, `_` and `.` do not matter)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read(path: Path) -> tuple[list[str], dict[str, tuple[str, str, list[str]]], list[str]]:
    """(header comment lines, normalized name -> (name, version, hashes), problems) of one lock file."""
    header, entries, problems = [], {}, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            if not entries:
                header.append(line)
            continue
        match = LINE.match(line.strip())
        if match is None:
            problems.append(f"{path.name}:{number}: not `name==version --hash=sha256:...`: {line!r}")
            continue
        key = normalized(match["name"])
        if key in entries:
            problems.append(f"{path.name}:{number}: {match['name']} is pinned twice")
        entries[key] = (match["name"], match["version"], re.findall(r"sha256:([0-9a-f]{64})", match["hashes"]))
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if lines != sorted(lines, key=lambda text: normalized(text.split("==")[0])):
        problems.append(f"{path.name}: lines are not sorted by name (sort them, or run infra/lock.py)")
    unhashed = [f"{name}=={version}" for name, version, hashes in entries.values() if not hashes]
    if unhashed:
        problems.append(f"{path.name}: {len(unhashed)} line(s) without a hash (run infra/lock.py): "
                        f"{', '.join(unhashed[:5])}{' ...' if len(unhashed) > 5 else ''}")
    return header, entries, problems


def hashes_from_pip(pins: list[tuple[str, str]]) -> dict[str, list[str]]:
    """normalized name -> [sha256 of the file pip would install for name==version here]."""
    with tempfile.TemporaryDirectory() as scratch:
        requirements, report = Path(scratch) / "pins.txt", Path(scratch) / "report.json"
        requirements.write_text("".join(f"{name}=={version}\n" for name, version in pins))
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps", "-q",
                        "--report", str(report), "-r", str(requirements)], check=True)
        installs = json.loads(report.read_text())["install"]
    found = {}
    for item in installs:
        archive = item["download_info"].get("archive_info", {})
        digest = archive.get("hashes", {}).get("sha256")
        if digest is None:
            raise SystemExit(f"pip reported no sha256 for {item['metadata']['name']} ({item['download_info']['url']})")
        found[normalized(item["metadata"]["name"])] = [digest]
    return found


def write(path: Path, header: list[str], entries: dict[str, tuple[str, str, list[str]]]) -> None:
    lines = [f"{name}=={version}" + "".join(f" --hash=sha256:{h}" for h in hashes)
             for _, (name, version, hashes) in sorted(entries.items())]
    path.write_text("\n".join([*header, *lines]) + "\n")


def frozen() -> dict[str, tuple[str, str]]:
    """What this .venv holds (everything but pip and edgeship itself): normalized name -> (name, version)."""
    listed = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json", "--exclude-editable"],
                            check=True, capture_output=True, text=True).stdout
    return {normalized(p["name"]): (p["name"], p["version"]) for p in json.loads(listed)
            if normalized(p["name"]) not in ("pip", "edgeship")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, default=LOCKS, help="lock files (default: all three)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="report problems, change nothing")
    mode.add_argument("--refresh", action="store_true", help="recompute every hash")
    mode.add_argument("--freeze", action="store_true", help="rewrite constraints.txt from this .venv's packages")
    args = parser.parse_args(argv)
    args.files = [path.resolve() for path in args.files]
    if args.freeze:
        args.files = [LOCKS[0]]
    failed = False
    for path in args.files:
        header, entries, problems = read(path)
        if args.check:
            for problem in problems:
                print(problem, file=sys.stderr)
            failed |= bool(problems)
            continue
        if args.freeze:
            kept = {key: (name, version, entries[key][2] if key in entries and entries[key][1] == version else [])
                    for key, (name, version) in frozen().items()}
            entries = kept
        wanted = [(name, version) for name, version, hashes in entries.values() if args.refresh or not hashes]
        if wanted:
            for key, digests in hashes_from_pip(wanted).items():
                name, version, _ = entries[key]
                entries[key] = (name, version, digests)
        write(path, header, entries)
        print(f"{path.relative_to(ROOT)}: {len(entries)} packages, {len(wanted)} hashed now")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
