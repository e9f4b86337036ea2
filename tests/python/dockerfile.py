"""Just enough of a Dockerfile reader for the tests: instructions, stages and their arguments."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def words(self) -> list[str]:
        text = self.args.strip()
        if text.startswith("["):
            return json.loads(text)
        return shlex.split(text)


@dataclass
class Stage:
    base: str
    """The FROM image with ARG defaults filled in (as a build without --build-arg sees it)."""
    name: str | None
    raw_base: str = ""
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE pairs (the only ENV form these files use)."""
        out: dict[str, str] = {}
        for ins in self.all("ENV"):
            for word in ins.words():
                key, _, value = word.partition("=")
                out[key] = value
        return out


def instructions(path: Path) -> list[Instruction]:
    """Joins continuation lines, drops comments and blank lines."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def global_args(path: Path) -> dict[str, str]:
    """The ARGs before the first FROM (those a FROM line may use), with their defaults."""
    out: dict[str, str] = {}
    for ins in instructions(path):
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            out[name.strip()] = default.strip()
    return out


def stages(path: Path) -> list[Stage]:
    result: list[Stage] = []
    defaults = global_args(path)
    for ins in instructions(path):
        if ins.keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", ins.args, flags=re.IGNORECASE)
            assert match, f"{path}:{ins.line}: unreadable FROM {ins.args!r}"
            raw = match.group(1)
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], raw)
            result.append(Stage(base, match.group(2), raw_base=raw))
        elif result:
            result[-1].instructions.append(ins)
    return result


def copy_parts(ins: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(--options, sources, destination) of a COPY or ADD."""
    words = ins.words()
    options = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        options[key] = value
    return options, words[:-1], words[-1]
