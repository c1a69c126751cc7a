"""buildfarm-inventory(5), from the two sources of truth about the inventory: the fields of
inventory.Machine with how the parser checks them (names, types, limits, defaults), and the
comments of inventory.example.yaml, which describe each field in prose (and are what users read
when they copy the file). A field without a description, or a description of no field, is an
error: the page cannot be made until both agree.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from buildfarm import __version__, inventory, inventory_fields
from buildfarm.docs import roff

_ITEM = re.compile(r"^  (\S+?)\s{2,}(\S.*)$")  # "  name   description" under "# "
_FIELDS_HEADING = "Every machine field, with its default and an example:"


class ExampleError(ValueError):
    """inventory.example.yaml and inventory.Machine disagree."""


@dataclass(frozen=True, slots=True)
class Block:
    """A paragraph of the example's comments: running text, or a list of tagged items."""

    text: str = ""
    items: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Example:
    title: str
    intro: tuple[Block, ...]  # before the field list
    fields: dict[str, str]  # field name -> its description
    yaml: tuple[str, ...]  # the example inventory itself, comments included


def _blocks(lines: list[str]) -> list[Block]:
    """Paragraphs (split at empty comment lines) of text and tagged items."""
    blocks: list[Block] = []
    text: list[str] = []
    items: list[list[str]] = []

    def flush() -> None:
        if text:
            blocks.append(Block(text=" ".join(text)))
        if items:
            blocks.append(Block(items=tuple((i[0], " ".join(i[1:])) for i in items)))
        text.clear()
        items.clear()

    for line in lines:
        match = _ITEM.match(line)
        if not line.strip():
            flush()
        elif match:
            if text:
                flush()
            items.append([match[1].rstrip(":"), match[2]])
        elif line.startswith("    ") and items:
            items[-1].append(line.strip())
        else:
            if items:
                flush()
            text.append(line.strip())
    flush()
    return blocks


def read_example(path: Path) -> Example:
    """The comments at the top of inventory.example.yaml, and the YAML after them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    comments: list[str] = []
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            rest = lines[index:]
            break
        comments.append(line[2:] if line.startswith("# ") else line[1:])
    else:
        rest = []
    title, *body = comments
    if _FIELDS_HEADING not in body:
        raise ExampleError(f"{path}: no line {_FIELDS_HEADING!r} before the field list")
    split = body.index(_FIELDS_HEADING)
    intro = _blocks(body[:split])
    described: dict[str, str] = {}
    for block in _blocks(body[split + 1 :]):
        for name, description in block.items:
            described[name] = description
    declared = [f.name for f in dataclasses.fields(inventory.Machine)]
    missing = [name for name in declared if name not in described]
    extra = [name for name in described if name not in declared]
    if missing or extra:
        raise ExampleError(
            f"{path}: the field list and inventory.Machine differ: undescribed {missing}, "
            f"not fields {extra}"
        )
    while rest and not rest[0].strip():
        rest = rest[1:]
    return Example(title.strip(), tuple(intro), {n: described[n] for n in declared},
                   tuple(rest))


def field_type(name: str) -> str:
    """What the parser accepts for a field, in words (from inventory's declarations)."""
    spec = inventory_fields.FIELDS[name]  # the parser's own table of fields
    words = {"str": "string", "int": "integer", "float": "number", "bool": "true or false",
             "list": "list of strings", "map": "mapping of words to words"}[spec.kind]
    if spec.choices:
        words = " or ".join(spec.choices)
    if spec.minimum is not None:
        low = f"{spec.minimum:g}"
        if spec.maximum is not None:
            words += f", {low} to {spec.maximum}"
        else:
            words += f", {'>' if spec.exclusive else '>='} {low}"
    if spec.nonempty:
        words += ", not empty"
    if spec.optional:
        words += ", or null"
    if not spec.in_defaults:
        words += "; not allowed under defaults"
    return words


def page(example: Example) -> str:
    out = roff.header("buildfarm-inventory", 5, __version__,
                      "buildfarm/inventory.py, inventory_fields.py and inventory.example.yaml")
    out += [".SH NAME", "buildfarm\\-inventory \\- the machines buildfarm builds on, in YAML",
            ".SH SYNOPSIS", "\\fI~/.config/buildfarm/inventory.yaml\\fR",
            ".br", "buildfarm \\-\\-inventory \\fIPATH\\fR ...",
            ".br", "BUILDFARM_INVENTORY=\\fIPATH\\fR buildfarm ..."]
    out += [".SH DESCRIPTION"]
    for index, block in enumerate(example.intro):
        if block.text and index == 0:
            out.append(roff.marked(block.text))
            continue
        if block.text:
            out += roff.paragraphs(block.text)
        for tag, text in block.items:
            out += roff.tagged(tag, text, code=True)
    out += roff.section(
        "FIELDS", "Each field of a machine (or of defaults), with what the parser accepts "
        "and, in the description, its default and an example.")
    for name, description in example.fields.items():
        out += roff.tagged_lines(name, f"({field_type(name)}) {description}")
    out += roff.section(
        "RELOADING",
        "A running buildfarm run reads the inventory again on SIGHUP and whenever the file "
        "changes: machines added take builds at once, machines removed finish what they run. "
        "A file with a mistake is not used; the coordinator keeps the inventory it has. See "
        "buildfarm-run(1).")
    out += [".SH EXAMPLE", roff.text("The file inventory.example.yaml of the buildfarm sources, "
                                     "without its comments at the top:")]
    out += roff.example(*example.yaml)
    out += roff.see_also([("buildfarm", 1), ("buildfarm-machines", 1),
                          ("buildfarm-machines-test", 1), ("buildfarm-run", 1),
                          ("ssh-keyscan", 1)])
    return "\n".join(out) + "\n"
