"""No float on any money path: the money modules and the Lua scripts are checked as source."""

from __future__ import annotations

import ast
import re
from importlib.resources import files
from pathlib import Path

import pytest

import sidecar

MONEY_MODULES = [
    "money.py",
    "pricing.py",
    "afford.py",
    "balances.py",
    "admin.py",
    "usage.py",
    "keys.py",
    "pipeline/outcome.py",
    "payments/packages.py",
    "payments/stripe_events.py",
    "payments/refunds.py",
]
LUA_SCRIPTS = sorted(p.name for p in Path(str(files("sidecar") / "lua")).glob("*.lua"))


@pytest.mark.parametrize("module", MONEY_MODULES)
def test_money_modules_use_no_float(module: str) -> None:
    tree = ast.parse((Path(sidecar.__file__).parent / module).read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            found.append(f"float literal {node.value} at line {node.lineno}")
        elif isinstance(node, ast.Name) and node.id == "float":
            found.append(f"float at line {node.lineno}")
        elif isinstance(node, ast.Div):
            found.append("true division")
        elif isinstance(node, ast.Attribute) and node.attr in {"time", "monotonic"}:
            found.append(f"clock read at line {getattr(node, 'lineno', '?')}")
    assert found == []


def test_lua_scripts_are_shipped_in_the_package() -> None:
    assert {"reserve.lua", "settle.lua", "credit.lua", "expire_hold.lua"} <= set(LUA_SCRIPTS)


@pytest.mark.parametrize("script", LUA_SCRIPTS)
def test_lua_scripts_do_integer_arithmetic_only(script: str) -> None:
    source = (files("sidecar") / "lua" / script).read_text()
    code = "\n".join(line.split("--", 1)[0] for line in source.splitlines())
    assert "/" not in code, "division makes fractions"
    assert not re.search(r"\d\.\d|\de[+-]?\d", code), "decimal or exponent literals"
    assert "math." not in code
    assert "tostring" not in code, "tostring may print large numbers in exponent form"
