"""herd up's start under a slow machine: Ray's raylet gets a fixed 30 s to register, and on a loaded
2-core machine it sometimes needs more; herd up starts Ray again, and names what did not start."""
import subprocess
import sys

import pytest

from herd.deploy import DeployConfig
from herd.up import RAY_START_ATTEMPTS, Cluster, ray_environment


@pytest.mark.parametrize("why", ["The current node timed out during startup. This could happen because some of the "
                                 "raylet failed to startup or the GCS has become overloaded.",
                                 "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_0123"])
def test_a_ray_that_never_registers_is_retried_then_named(herd_home, monkeypatch, why):
    ray_environment()  # as herd up does before Ray is first imported: later tests' Ray reads it
    import ray

    calls, left = [], []

    def slow_init(**kwargs):  # as Ray's does: its processes started, the raylet late, no node to shut down
        calls.append(kwargs)
        gcs = [sys.executable, "-c", "import time; time.sleep(120)", "/venv/ray/core/src/ray/gcs/gcs_server"]
        left.append(subprocess.Popen(gcs))
        raise Exception(why)

    monkeypatch.setattr(ray, "init", slow_init)
    said = []
    cluster = Cluster(DeployConfig.load(None, model="tiny-maverick", dashboard=False), log=said.append)
    with pytest.raises(RuntimeError) as err:
        cluster.start()
    assert len(calls) == RAY_START_ATTEMPTS
    assert "fixed start-up waits" in str(err.value) and why in str(err.value)
    assert f"{RAY_START_ATTEMPTS} attempts" in str(err.value)
    assert sum("starting it again" in line for line in said) == RAY_START_ATTEMPTS - 1
    assert cluster.redis is None and cluster.state_redis is None  # what it had started is stopped
    assert all(proc.poll() is not None for proc in left)  # and what each failed Ray start left behind


def test_another_ray_failure_is_not_retried(herd_home, monkeypatch):
    ray_environment()
    import ray

    calls = []

    def broken_init(**kwargs):
        calls.append(kwargs)
        raise ValueError("bad option")

    monkeypatch.setattr(ray, "init", broken_init)
    with pytest.raises(RuntimeError, match="bad option"):
        Cluster(DeployConfig.load(None, model="tiny-maverick", dashboard=False), log=lambda *_: None).start()
    assert len(calls) == 1
