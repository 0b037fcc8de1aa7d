"""Generated tables in Markdown files: replace what stands between `<!-- NAME:start -->` and `<!-- NAME:end -->`."""

from __future__ import annotations

from pathlib import Path


def put_between(path: Path, name: str, text: str) -> None:
    """Write `text` between the file's NAME markers, so a README's table can only come from the tool that made it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    old = Path(path).read_text()
    if start not in old or end not in old.split(start, 1)[1]:
        raise SystemExit(f"{path}: no {start} ... {end} markers to put the table between")
    head, rest = old.split(start, 1)
    Path(path).write_text(head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1])
