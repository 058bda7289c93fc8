"""The suite's safety net: everything it starts (S3 server, Ray) can only be on loopback."""

import socket
import sys

import pytest


@pytest.mark.skipif(sys.platform != "linux", reason="network namespaces are Linux-only")
def test_the_suite_runs_in_a_loopback_only_network_namespace():
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
