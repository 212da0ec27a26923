"""The admin API's schema of a federation's config, derived from ``FederationConfig`` itself: each field's type,
default and description (its attribute docstring) come from the domain dataclass, its bounds from
``CONFIG_BOUNDS`` and its section from ``CONFIG_SECTIONS``, so the config is declared once."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
from typing import Any, get_type_hints

from pydantic import BaseModel, Field, create_model

from server.domain.federation_config import CONFIG_BOUNDS, CONFIG_SECTIONS, FederationConfig

EXAMPLES: dict[str, Any] = {
    "clip_norm": 5.0, "max_update_norm": 20.0, "robust_rule": "median", "exclude_above": 3.0,
    "exclude_cosine_below": 0.0, "eligible_modality_sets": [["audio", "image"], ["image"]],
}
"""One example value per field where the default does not show what a value looks like (together they make a
config the coordinator accepts: the admin API test checks it)."""
CONSTRAINTS: dict[str, dict[str, Any]] = {
    "task": {"max_length": 65536},
    "exclude_cosine_below": {"ge": -1, "lt": 1, "allow_inf_nan": False},
}
"""Limits of fields that are not numbers of ``CONFIG_BOUNDS``."""


def attribute_docs(cls: type) -> dict[str, str]:
    """A class's attribute docstrings (the string literal right under an annotated attribute), one line each."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, following in itertools.pairwise(body):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            text = " ".join(following.value.value.split())
            docs[node.target.id] = re.sub(r"``([^`]+)``", r"`\1`", text)
    return docs


def _limits(name: str, default: Any) -> dict[str, Any]:
    bounds = CONFIG_BOUNDS.get(name)
    if bounds is None:
        return CONSTRAINTS.get(name, {})
    cast = int if isinstance(default, int) and not isinstance(default, bool) else float
    return {"gt" if bounds.low_open else "ge": cast(bounds.low), "lt" if bounds.high_open else "le": cast(bounds.high),
            "allow_inf_nan": False}


def federation_config_body(base: type[BaseModel]) -> type[BaseModel]:
    """The pydantic model named ``FederationConfigBody`` on ``base``, with one field per ``FederationConfig`` field."""
    docs = attribute_docs(FederationConfig)
    hints = get_type_hints(FederationConfig)
    section_of = {name: section for section, names in CONFIG_SECTIONS.items() for name in names}
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(FederationConfig):
        options: dict[str, Any] = ({"default": field.default} if field.default is not dataclasses.MISSING
                                   else {"default_factory": field.default_factory})
        options.update(description=docs.get(field.name), json_schema_extra={"x-section": section_of[field.name]},
                       **_limits(field.name, options.get("default")))
        if field.name in EXAMPLES:
            options["examples"] = [EXAMPLES[field.name]]
        fields[field.name] = (hints[field.name], Field(**options))
    return create_model("FederationConfigBody", __base__=base, __doc__=base.__doc__, **fields)
