"""The configuration reference (docs/configuration.md), generated from config.py: every key as a
user writes it (a YAML section, `--set section.key=value`), its type, its default and the comment
beside its field in config.py. The comments are read from config.py's source (ast and tokenize),
the types and defaults from the dataclasses themselves, so the reference cannot drift from the
code: tests/test_config.py fails when the committed file is stale.

    python -m ray_codistill.config_reference > docs/configuration.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import tokenize
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

from ray_codistill import config

COMMAND = "python -m ray_codistill.config_reference > docs/configuration.md"


@dataclass(frozen=True)
class Key:
    key: str  # dotted, as `--set` takes it: `codistill.alpha`
    type: str
    default: Any
    comment: str


@dataclass(frozen=True)
class Section:
    prefix: str  # "" for the top level, else "codistill." and so on
    doc: str  # the class docstring, if it has one
    keys: list[Key]


def source_comments(source: str) -> dict[str, tuple[str, dict[str, str]]]:
    """class name -> (its docstring, field name -> the field's comment): the comment lines right
    above the field (no blank line between), then the comment at the end of its line(s)."""
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()
    classes = {}
    for cls in ast.parse(source).body:
        if not isinstance(cls, ast.ClassDef):
            continue
        fields = {}
        for node in cls.body:
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            above, line = [], node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            fields[node.target.id] = " ".join(above + trailing)
        classes[cls.name] = (" ".join((ast.get_docstring(cls) or "").split()), fields)
    return classes


def type_name(hint: Any) -> str:
    """A field's type in the words of the YAML a user writes."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Literal:
        values = [f"`{a}`" for a in args]
        return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]
    if args and type(None) in args:  # X | None
        inner, = [a for a in args if a is not type(None)]
        return f"{type_name(inner)} or null"
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"{{{type_name(args[0])}: {type_name(args[1])}}}"
    return hint.__name__


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def sections(cls: type = config.ExperimentConfig, prefix: str = "") -> list[Section]:
    """The config's keys, section by section: the top level's own fields first, then each nested
    section (a dataclass field) in the order config.py declares them."""
    doc, comments = source_comments(inspect.getsource(config))[cls.__name__]
    hints = get_type_hints(cls)
    keys, nested = [], []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            nested += sections(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(Key(prefix + f.name, type_name(hints[f.name]), _default(f), comments.get(f.name, "")))
    return [Section(prefix, doc, keys), *nested]


def yaml_value(value: Any) -> str:
    """A default as it is written in YAML (null, true, [], 0.01)."""
    return value if isinstance(value, str) else json.dumps(value)


def _cell(text: str) -> str:
    """Markdown for a table cell: `|` escaped everywhere, `*` and `<` outside code spans."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([*<])", r"\\\1", parts[i])
    return "`".join(parts).replace("|", "\\|")


def reference() -> str:
    out = ["# Configuration reference", "",
           "Every key of the experiment config: its type, its default and what it means. Generated from",
           "[`ray_codistill/config.py`](../ray_codistill/config.py) (the dataclasses and the comments beside",
           "their fields); do not edit it by hand: change config.py, then regenerate it from the repository",
           "root (`tests/test_config.py` fails while it is stale):",
           "", f"    {COMMAND}", "",
           "A key is written as a YAML section in a preset (`codistill:` then `alpha: 0.5`) or, dotted, on",
           "the command line: `--set codistill.alpha=0.5`, the value read as YAML (`null`, `true`, `[1, 2]`,",
           "`{k: v}`). Unknown keys and invalid values are refused before anything starts (exit status 2)."]
    for section in sections():
        name = section.prefix.rstrip(".")
        out += ["", f"## `{name}`" if name else "## Top level", ""]
        if section.doc:
            out += [section.doc, ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        out += [f"| `{k.key}` | {_cell(k.type)} | {_cell(f'`{yaml_value(k.default)}`')} | {_cell(k.comment)} |"
                for k in section.keys]
    return "\n".join(out) + "\n"


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
