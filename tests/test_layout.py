"""The shape of the code that review rules rest on: pure modules import no I/O library, no module grows
past ~300 lines, and test modules share helpers through tests/support.py, never through each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Modules that decide without doing I/O: importing one must not import an I/O library.
PURE = [
    "sidecar.money",
    "sidecar.errors",
    "sidecar.pricing",
    "sidecar.price_routes",
    "sidecar.routing",
    "sidecar.routing_settings",
    "sidecar.usage",
    "sidecar.wire",
    "sidecar.cachekey",
    "sidecar.afford",
    "sidecar.keys",
    "sidecar.outbox",
    "sidecar.headers",
    "sidecar.config",
    "sidecar.tables",
    "sidecar.environment",
    "sidecar.pipeline.admit",
    "sidecar.pipeline.choices",
    "sidecar.pipeline.attribution",
    "sidecar.pipeline.outcome",
    "sidecar.pipeline.retry",
    "sidecar.payments.packages",
    "sidecar.payments.signatures",
    "sidecar.payments.referral_codes",
    "sidecar.signals.alert_rules",
    "sidecar.documents.render",  # (and render_pdf, render_csv, document_text, which it imports)
    "sidecar.signals.schedule",
    "sidecar.signals.letters",
    "sidecar.signals.settings",
    "sidecar.metering.meters_periods",
    "sidecar.metering.settings",
    "sidecar.metering.operation_holds",
    "sidecar.flights",
    "sidecar.metering.idempotency_settings",
    "sidecar.documents.tax",
    "sidecar.documents.tax_settings",
    "sidecar.documents.countries",
    "sidecar.documents.plan_periods",
    "sidecar.documents.plan_settings",
    "sidecar.documents.plan_views",
]
IO_LIBRARIES = ("aiohttp", "redis", "asyncpg")
MAX_MODULE_LINES = 310  # "about 300": a module past it does more than one thing


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io_library(module: str) -> None:
    probe = f"import sys, {module}\nprint(','.join(n for n in {IO_LIBRARIES!r} if n in sys.modules))"
    # A fresh interpreter: this one has every library loaded already.
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_the_probe_sees_an_io_import() -> None:
    """The check above can fail: a module that does import aiohttp is reported."""
    probe = f"import sys, sidecar.responses\nprint(','.join(n for n in {IO_LIBRARIES!r} if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "aiohttp" in out.stdout


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in ROOT.glob("sidecar/**/*.py")
    }
    assert len(sizes) > 20
    assert {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_test_module_imports_another() -> None:
    offenders = []
    for path in (ROOT / "tests").glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _is_test_module(node):
                offenders.append(f"{path.name}: from {'.' * node.level}{node.module}")
    assert offenders == []


def _is_test_module(node: ast.ImportFrom) -> bool:
    ours = node.level > 0 or (node.module or "").startswith("tests.")
    return ours and (node.module or "").split(".")[-1].startswith("test_")
