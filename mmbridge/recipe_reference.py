"""The recipe reference page (docs/guide/recipe-reference.md), generated from the schema in `config.py`: every
section's fields with their types, defaults and the comments written beside them in the source.

    python -m mmbridge.recipe_reference > docs/guide/recipe-reference.md

`tests/test_recipe_reference.py` fails when the page and the schema disagree.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing

from mmbridge import config

SECTIONS = [
    ("recipe", config.Recipe),
    ("model", config.ModelConfig),
    ("sources.NAME", config.DataSource),
    ("stages[i]", config.StageConfig),
    ("stages[i].lora", config.LoraConfig),
    ("stages[i].moe", config.MoeConfig),
    ("stages[i].mma", config.MmaConfig),
    ("eval.NAME", config.EvalTask),
]


def _comments(cls) -> dict[str, str]:
    """Each field's comment in the source: the lines just above it and the one at its end."""
    lines, start = inspect.getsourcelines(cls)
    tree = ast.parse("".join(lines).replace("\n    ", "\n", 0))
    body = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)).body
    found = {}
    for node in body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        above, i = [], node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip()[1:].strip())
            i -= 1
        end = lines[node.end_lineno - 1]
        after = end.split("  # ", 1)[1].strip() if "  # " in end else ""
        found[node.target.id] = " ".join([*above, after]).strip()
    return found


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "its section below"
    return "`" + repr(value).replace("|", "\\|") + "`"


def _type(cls, name: str) -> str:
    hint = typing.get_type_hints(cls).get(name)
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return (text or str(hint).replace("typing.", "")).replace("|", "\\|")


def render() -> str:
    out = [
        "# Recipe reference",
        "",
        "Every key of a recipe, generated from `mmbridge/config.py` (`python -m mmbridge.recipe_reference`);",
        "an unknown key is an error that names it. The guide with examples is [Recipes and devices](recipes.md).",
        "",
    ]
    for where, cls in SECTIONS:
        doc = cls.__doc__ or ""
        generated = doc.startswith(cls.__name__ + "(")  # a dataclass without a docstring gets its signature
        summary = "" if generated else inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ")
        out += [f"## `{where}`", ""] + ([summary, ""] if summary else [])
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        notes = _comments(cls)
        for f in dataclasses.fields(cls):
            note = notes.get(f.name, "").replace("|", "\\|")
            out.append(f"| `{f.name}` | {_type(cls, f.name)} | {_default(f)} | {note} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render(), end="")
