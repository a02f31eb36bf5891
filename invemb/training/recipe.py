"""YAML as recipes and key=value overrides are written: every float literal a user would type is a float.

PyYAML implements YAML 1.1, whose float needs a dot and a signed exponent: `2e-4`, `1E-3` and `1.0e3` load as
strings there, so `lr=2e-4` was refused ("must be float, got '2e-4'"). RecipeLoader is SafeLoader plus YAML 1.2's
float form ([-+]? digits[.digits] | .digits, then an optional exponent with an optional sign); ints, strings,
`.inf` / `.nan` and everything else load as SafeLoader loads them.
"""
from __future__ import annotations

import re

import yaml

# YAML 1.2 core-schema floats (a dot or an exponent is required, so `12` stays an int): `2e-4`, `1E-3`, `.5`,
# `5.`, `-1.5e+3`, `1.0e3`
FLOAT_RE = re.compile(r"^(?=[^eE]*[.eE])[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads `2e-4`, `1E-3`, `-1.5e+3`, `1.0e3` as floats."""


# add_implicit_resolver copies SafeLoader's resolver table into RecipeLoader first: SafeLoader is not changed
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_RE, list("-+0123456789."))


def load_yaml(text: str):
    """The YAML document `text` read with RecipeLoader (yaml.YAMLError on bad YAML, as yaml.safe_load)."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)
