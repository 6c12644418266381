import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from harness import ConnectorServer, Propeller  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ConnectorServer(str(tmp_path_factory.mktemp("connector"))).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def propeller(server):
    return Propeller(server)


@pytest.fixture
def base(tmp_path):
    return str(tmp_path)
