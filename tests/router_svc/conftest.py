"""Shared by the router's tests: real expert worker servers on loopback whose RunExperts the test
wraps (to record or hold what they are sent); router_fixtures.router_over puts a router over them."""
import pytest
import torch

from expert_svc.server import serve as serve_worker


@pytest.fixture(scope="module")
def workers():
    """start(path, expert_sets, wrap) -> {index: registry record}: one worker server per expert set,
    its servicer.run replaced by wrap(index, run); every server stops with the module."""
    servers = []

    def start(path, expert_sets, wrap):
        records = {}
        for index, experts in enumerate(expert_sets):
            server, port, servicer = serve_worker(str(path), experts, torch.float32, "cpu")
            servicer.run = wrap(index, servicer.run)
            records[index] = {"address": f"127.0.0.1:{port}", "experts": experts,
                              "fingerprint": servicer.fingerprint}
            servers.append(server)
        return records

    try:
        yield start
    finally:
        for server in servers:
            server.stop(0)
