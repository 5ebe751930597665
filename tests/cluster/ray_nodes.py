"""A Ray cluster of separate raylets on this machine, for tests: `python ray_nodes.py NODES RESOURCES`.

A head (no resources of its own) and NODES worker nodes, each a raylet of its own offering the
JSON custom RESOURCES, every listener on 127.0.0.1. Run with RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN in the environment (Ray reads them at import) and RAY_TMPDIR set to a private
directory. The node processes inherit the environment, and so do the actors they start.

It prints one JSON line, {"address": GCS, "dashboard": URL, "nodes": [worker node ids]}, then
answers one JSON line per command line on stdin: {"cmd": "nodes"} and {"cmd": "actors"}
(Ray's state API), {"cmd": "kill", "node": ID} (every process of that node is killed at once:
the node is lost). End of stdin, or the test process dying, stops every node.
"""
from __future__ import annotations

import json
import os
import socket
import sys

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # local-only: Ray's nodes bind to 127.0.0.1

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.state import list_actors, list_nodes  # noqa: E402

HOST = "127.0.0.1"
# Tests lose a node: notice it within ~2 s instead of Ray's default ~15 s.
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
                          "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def answer(cluster: Cluster, nodes: dict, request: dict):
    if request["cmd"] == "nodes":
        return [{"node_id": n.node_id, "state": n.state, "is_head": n.is_head_node}
                for n in list_nodes(address=cluster.address, timeout=10)]
    if request["cmd"] == "actors":
        return [{"name": a.name, "node_id": a.node_id, "state": a.state, "pid": a.pid}
                for a in list_actors(address=cluster.address, timeout=10)]
    if request["cmd"] == "kill":
        cluster.remove_node(nodes.pop(request["node"]), allow_graceful=False)
        return True
    raise ValueError(f"unknown command {request['cmd']!r}")


def main() -> None:
    count, resources = int(sys.argv[1]), json.loads(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        node_ip_address=HOST, num_cpus=0, include_dashboard=True, dashboard_host=HOST,
        dashboard_port=free_port(), dashboard_agent_listen_port=free_port(),
        _system_config=FAST_FAILURE_DETECTION))
    try:
        nodes = {}
        for _ in range(count):  # started together, waited for together
            node = cluster.add_node(wait=False, node_ip_address=HOST, num_cpus=1, resources=resources,
                                    dashboard_agent_listen_port=free_port())
            nodes[node.node_id] = node
        cluster.wait_for_nodes(timeout=60)
        print(json.dumps({"address": cluster.address, "dashboard": cluster.webui_url, "nodes": list(nodes)}),
              flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            try:
                print(json.dumps({"ok": answer(cluster, nodes, request)}), flush=True)
            except Exception as exc:  # the test reads the error and fails with it
                print(json.dumps({"error": repr(exc)}), flush=True)
    finally:
        cluster.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
