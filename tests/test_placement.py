"""Placement: selectors and resources turned into Ray's options, refused before anything starts
when no node can hold them, and Tune's concurrency counted over every resource an experiment needs."""

from __future__ import annotations

import pytest

from ray_codistill.config import load_config
from ray_codistill.errors import ConfigError
from ray_codistill.placement import (broker_options, check_placement, concurrent_experiments, label_matches,
                                     scaling_kwargs)

from conftest import CONFIGS


def _cfg(*overrides):
    return load_config(CONFIGS / "smoke.yaml", list(overrides))


def _node(name, cpus=1.0, gpus=0.0, **custom):
    return {"labels": {"emulated-node": name, "ray.io/node-id": name * 8},
            "resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {}), **custom, f"node:{name}": 1.0}}


NODES = [_node("n0", 2.0), _node("n1", 1.0), _node("n2", 1.0)]
PINNED = "placement.replica_labels=[{emulated-node: n1}, {emulated-node: n2}]"


def test_label_selector_operators():
    assert label_matches("a", "a") and not label_matches("a", "b") and not label_matches("a", None)
    assert label_matches("!a", "b") and label_matches("!a", None) and not label_matches("!a", "a")
    assert label_matches("in(a, b)", "b") and not label_matches("in(a,b)", "c")
    assert label_matches("!in(a,b)", "c") and not label_matches("!in(a,b)", "a")


def test_replicas_pinned_by_labels_become_per_worker_selectors():
    cfg = _cfg(PINNED, "workers_per_replica=2", "cpus_per_worker=0.25")
    assert scaling_kwargs(cfg, 1)["label_selector"] == [{"emulated-node": "n2"}] * 2
    assert scaling_kwargs(cfg, 0)["resources_per_worker"] == {"CPU": 0.25}
    # allreduce: replica r's share of the R x W workers goes where replica r would
    ar = cfg.replace(method="allreduce", **{"placement.strategy": "SPREAD"})
    kw = scaling_kwargs(ar, 0)
    assert kw["label_selector"] == [{"emulated-node": "n1"}] * 2 + [{"emulated-node": "n2"}] * 2
    assert kw["placement_strategy"] == "SPREAD"
    assert "label_selector" not in scaling_kwargs(_cfg(), 0)


def test_custom_resources_and_broker_placement():
    cfg = _cfg("placement.replica_resources=[{left: 1}, {right: 0.5}]", "placement.broker_labels={emulated-node: n0}")
    assert scaling_kwargs(cfg, 1)["resources_per_worker"] == {"CPU": 0.5, "right": 0.5}
    assert broker_options(cfg) == {"label_selector": {"emulated-node": "n0"}}
    assert broker_options(_cfg()) == {}


@pytest.mark.parametrize("override, key, named", [
    ("placement.replica_labels=[{emulated-node: n1}, {emulated-node: n9}]", "placement.replica_labels[1]",
     "emulated-node=n9"),
    ("placement.replica_labels=[{zone: a}, {}]", "placement.replica_labels[0]", "zone=a"),
    ("placement.replica_resources=[{gpu_a100: 1}, {}]", "placement.replica_resources[0]", "'gpu_a100'"),
    ("placement.broker_labels={emulated-node: n7}", "placement.broker_labels", "emulated-node=n7"),
    ("placement.broker_resources={nope: 1}", "placement.broker_resources", "nope"),
])
def test_placement_no_node_has_is_refused_naming_the_key(override, key, named):
    with pytest.raises(ConfigError) as err:
        check_placement(_cfg(override), NODES)
    assert str(err.value).startswith(key + ":") and named in str(err.value), str(err.value)


def test_labelled_nodes_too_small_are_refused():
    cfg = _cfg(PINNED, "workers_per_replica=3", "cpus_per_worker=0.5")  # 1.5 CPUs on a 1-CPU node
    with pytest.raises(ConfigError, match=r"placement.replica_labels\[0\]: 3 worker\(s\) .* need 1.5 CPU"):
        check_placement(cfg, NODES)
    check_placement(_cfg(PINNED), NODES)  # 0.5 CPU on each: fits


def test_concurrency_counts_every_resource():
    # CPUs alone: 4 CPUs / 1 CPU per experiment
    assert concurrent_experiments(_cfg(), NODES) == 4
    # pinned to n1 and n2 (1 CPU each), 0.5 CPU a replica: 2, not the 4 the cluster's CPUs suggest
    assert concurrent_experiments(_cfg(PINNED), NODES) == 2
    # GPUs: 8 CPUs but 2 GPUs and 2 GPUs per experiment: 1 (CPUs alone said 8)
    gpu_nodes = [_node("g0", 4.0, gpus=1.0), _node("g1", 4.0, gpus=1.0)]
    assert concurrent_experiments(_cfg("use_gpu=true"), gpu_nodes) == 1
    # a custom resource: 3 units, 2 per experiment (1 per replica)
    res_nodes = [_node("a", 8.0, lic=3.0)]
    assert concurrent_experiments(_cfg("placement.replica_resources=[{lic: 1}, {lic: 1}]"), res_nodes) == 1
    assert concurrent_experiments(_cfg("use_gpu=true"), NODES) == 1  # never below 1


def test_run_refuses_an_unknown_label_with_exit_2(ray_cluster, tmp_path, capsys):
    """On the session's real Ray: the CLI refuses before a worker or the broker starts."""
    from ray_codistill import cli
    code = cli.main(["run", str(CONFIGS / "smoke.yaml"), "--storage", str(tmp_path), "--name", "placed",
                     "--set", "placement.replica_labels=[{emulated-node: n1}, {emulated-node: n2}]"])
    err = capsys.readouterr().err
    assert code == 2 and "placement.replica_labels[0]: no node of the cluster has the label emulated-node=n1" in err
    assert not (tmp_path / "placed").exists()  # nothing started, no results folder
