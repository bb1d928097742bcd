"""pytest-mpi and hpcml's harness together (see hpcml.testing.configure_pytest)."""

import pytest

from hpcml.testing import configure_pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    configure_pytest(config)
