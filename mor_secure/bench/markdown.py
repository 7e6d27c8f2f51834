"""BENCHMARKS.md is written by the bench commands alone: each owns one marked section.

A section is the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->``. A command
replaces its own section and leaves the others untouched; a section not yet in the file is
appended. The write is atomic (temporary file, then rename), so a crash mid-write never leaves
a half-written BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

HEADER = ("# Benchmarks\n\nEach section is written by the command it names, with the date and the machine. "
          "Rerun the command to reproduce; numbers from another machine are not comparable.\n")


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9_-]+", name):
        raise ValueError(f"benchmark section name {name!r}: use lower-case letters, digits, '-' or '_'")
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def update_section(path: Path | str, name: str, title: str, body: str) -> str:
    """Replace (or append) section ``name`` of the markdown file at ``path``; returns the new text."""
    path = Path(path)
    start, end = _markers(name)
    block = f"{start}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def read_section(path: Path | str, name: str) -> str | None:
    """The body of section ``name`` (between the markers, title included), or None."""
    start, end = _markers(name)
    m = re.search(re.escape(start) + r"\n(.*?)\n" + re.escape(end), Path(path).read_text(), re.S)
    return m.group(1) if m else None


def machine() -> str:
    """A one-line description of this machine (every section states where it was measured)."""
    import torch

    return f"{cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} " \
           f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def cpu_model() -> str | None:
    """The CPU's model name (Linux: /proc/cpuinfo), or None where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return f"{platform.machine()} {line.split(':', 1)[1].strip()}"
    except OSError:
        return None
    return None


def default_out() -> Path:
    """The repository's BENCHMARKS.md (this package's parent folder when it holds pyproject.toml),
    else ./BENCHMARKS.md."""
    repo = Path(__file__).resolve().parents[2]
    return repo / "BENCHMARKS.md" if (repo / "pyproject.toml").is_file() else Path.cwd() / "BENCHMARKS.md"
