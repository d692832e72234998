"""The extras install what the code was tested with: libtpu must match the pinned jax."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _extra(name: str) -> dict[str, Requirement]:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    return {Requirement(r).name: Requirement(r) for r in extras[name]}


def test_tpu_and_aot_extras_pin_the_tested_jax_and_libtpu():
    pins = _constraints()
    for extra in ("tpu", "aot"):
        reqs = _extra(extra)
        for package in ("jax", "libtpu"):
            spec = reqs[package].specifier
            assert str(spec) == f"=={pins[package]}", (extra, package, spec)


def test_the_pinned_libtpu_is_the_one_jax_asks_for():
    """jax's own ``tpu`` extra names the libtpu series it was built against."""
    pins = _constraints()
    assert importlib.metadata.version("jax") == pins["jax"]
    wanted = [Requirement(r) for r in importlib.metadata.requires("jax")
              if "libtpu" in r and 'extra == "tpu"' in r]
    assert wanted, "jax's metadata names no libtpu for its tpu extra"
    assert all(r.specifier.contains(pins["libtpu"]) for r in wanted), wanted
