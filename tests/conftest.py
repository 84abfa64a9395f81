from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository (pyproject.toml puts it on pytest's path)

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """The tiny demo preset (nine models, original layouts), written once per test session."""
    from kernel.demo.weights import write_demo_weights

    out = tmp_path_factory.mktemp("tiny_weights")
    manifest = write_demo_weights(out, "tiny")
    return out, manifest
