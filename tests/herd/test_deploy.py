"""Deployment config validation and expert placement (pure logic)."""
import pytest

from herd.deploy import DeployConfig, place_experts
from llama4.errors import HerdInputError


@pytest.mark.parametrize("policy", ["contiguous", "round-robin"])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_every_expert_on_exactly_replicas_distinct_workers(policy, replicas):
    shards = place_experts(16, 4, policy, replicas)
    for e in range(16):
        holders = [w for w, experts in enumerate(shards) if e in experts]
        assert len(holders) == replicas
    assert all(len(s) == 4 * replicas for s in shards)


def test_contiguous_shards_are_ranges():
    assert place_experts(8, 4, "contiguous") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert place_experts(8, 4, "round-robin") == [[0, 4], [1, 5], [2, 6], [3, 7]]


@pytest.mark.parametrize("yaml_text,needle", [
    ("workers: 0", "workers=0"),
    ("placement: random", "placement='random'"),
    ("replicas: 5\nworkers: 4", "replicas=5"),
    ("attention_port: 70000", "attention_port=70000"),
    ("dtype: int8", "dtype='int8'"),
    ("expert_dtype: int2", "expert_dtype='int2'"),
    ("batching: {max_num_seqs: 0}", "batching.max_num_seqs=0"),
    ("batching: {prefill: 3}", "batching.prefill"),
    ("wokers: 4", "'wokers'"),
    ("gpus_per_worker: 1.5", "gpus_per_worker=1.5"),
    ("worker_resources: {GPU: 1}", "worker_resources={'GPU': 1}"),
    ("worker_resources: {expert_slot: 0}", "worker_resources={'expert_slot': 0}"),
    ("worker_resources: {expert_slot: 1.5}", "worker_resources={'expert_slot': 1.5}"),
    ("worker_resources: {expert_slot: yes}", "worker_resources={'expert_slot': True}"),
    ("worker_resources: [expert_slot]", "worker_resources=['expert_slot']"),
    ("batching: {micro_batches: 0}", "batching.micro_batches=0"),
    ("batching: {micro_batches: many}", "batching.micro_batches='many'"),
    ("dispatch: workers", "dispatch='workers' is invalid; allowed: ['router', 'direct']"),
    ("coalesce: sometimes", "coalesce='sometimes' is invalid; allowed: true or false"),
    ("- a list", "mapping"),
])
def test_bad_config_names_field_and_value(tmp_path, yaml_text, needle):
    path = tmp_path / "deploy.yaml"
    path.write_text(yaml_text)
    with pytest.raises(HerdInputError) as err:
        DeployConfig.load(path)
    assert needle in str(err.value)


def test_defaults_work_locally():
    cfg = DeployConfig.load(None)
    assert cfg.host == "127.0.0.1" and cfg.redis_url is None and cfg.workers >= 1
    assert cfg.dispatch == "router" and DeployConfig.load(None, dispatch="direct").dispatch == "direct"


def test_worker_resources_are_ray_custom_resources():
    cfg = DeployConfig.load(None, worker_resources={"expert_slot": 1, "accelerator_type:H100": 0.001},
                            gpus_per_worker=1)
    assert cfg.worker_resources == {"expert_slot": 1, "accelerator_type:H100": 0.001}
    assert DeployConfig.load(None).worker_resources == {}  # locally: any node, by GPUs alone
