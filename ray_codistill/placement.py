"""Placement: which nodes hold each replica's workers, all-reduce's workers and the broker, in
Ray's own terms (node labels, custom resources, a placement strategy), checked against the
cluster's nodes before anything starts, and how many experiments fit on the cluster at once.

Pure functions over a list of nodes (`{"labels": {...}, "resources": {...}}`, as `ray.nodes()`
describes them), so the checks are tested without a cluster; `cluster_nodes()` reads them.
"""

from __future__ import annotations

import math
import re

from ray_codistill.config import ExperimentConfig
from ray_codistill.errors import ConfigError

_SET = re.compile(r"^(!?)in\((.*)\)$")


def cluster_nodes() -> list[dict]:
    """The alive nodes of the cluster this process is attached to."""
    import ray
    return [{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"], "labels": n.get("Labels") or {},
             "resources": n.get("Resources") or {}} for n in ray.nodes() if n.get("Alive")]


def label_matches(wanted: str, have: str | None) -> bool:
    """One label of a Ray label selector: `v`, `!v`, `in(a,b)` or `!in(a,b)`."""
    m = _SET.match(wanted)
    if m:
        values = {v.strip() for v in m.group(2).split(",")}
        return (have in values) != bool(m.group(1))
    if wanted.startswith("!"):
        return have != wanted[1:]
    return have == wanted


def selector_matches(selector: dict, labels: dict) -> bool:
    return all(label_matches(v, labels.get(k)) for k, v in selector.items())


def worker_resources(cfg: ExperimentConfig, replica: int) -> dict[str, float]:
    """What each worker of replica `replica`'s group asks for (allreduce: replica 0's entry), with
    the replica's own `cpus_per_worker` and `use_gpu` (`replica_overrides`)."""
    custom = cfg.placement.replica_resources[replica] if cfg.placement.replica_resources else {}
    own = cfg.for_replica(replica) if cfg.method != "allreduce" else cfg
    return {"CPU": own.cpus_per_worker, **({"GPU": 1.0} if own.use_gpu else {}), **custom}


def label_selector(cfg: ExperimentConfig, model: int) -> list[dict] | None:
    """Per-worker label selectors of worker group `model` (`ScalingConfig(label_selector=...)`)."""
    labels = cfg.placement.replica_labels
    if not labels or not any(labels):
        return None
    if cfg.method == "allreduce":  # replica r's share of the workers goes where replica r would
        return [dict(labels[w // cfg.workers_per_replica]) for w in range(cfg.workers_per_model)]
    return [dict(labels[model]) for _ in range(cfg.for_replica(model).workers_per_model)]


def scaling_kwargs(cfg: ExperimentConfig, model: int) -> dict:
    """The placement part of worker group `model`'s `ScalingConfig`."""
    kwargs = {"resources_per_worker": worker_resources(cfg, model),
              "placement_strategy": cfg.placement.strategy}
    selector = label_selector(cfg, model)
    if selector is not None:
        kwargs["label_selector"] = selector
    return kwargs


def broker_options(cfg: ExperimentConfig) -> dict:
    """Actor options placing the broker; {} keeps it on the driver's node."""
    opts = {}
    if cfg.placement.broker_labels:
        opts["label_selector"] = dict(cfg.placement.broker_labels)
    if cfg.placement.broker_resources:
        opts["resources"] = dict(cfg.placement.broker_resources)
    return opts


def demands(cfg: ExperimentConfig) -> list[tuple[str, dict, dict]]:
    """Every worker of the experiment: (config key that places it, label selector, resources)."""
    out = []
    for model in range(cfg.num_models):
        workers = cfg.workers_per_model if cfg.method == "allreduce" else cfg.for_replica(model).workers_per_model
        selectors = label_selector(cfg, model) or [{}] * workers
        for w, sel in enumerate(selectors):
            r = w // cfg.workers_per_replica if cfg.method == "allreduce" else model
            out.append((f"placement.replica_labels[{r}]", sel, worker_resources(cfg, r)))
    return out


def _describe(nodes: list[dict], what: str) -> str:
    if what == "labels":
        seen = sorted({f"{k}={v}" for n in nodes for k, v in n["labels"].items() if not k.startswith("ray.io/")})
    else:
        seen = sorted({k for n in nodes for k in n["resources"]
                       if k not in ("memory", "object_store_memory") and not k.startswith("node:")})
    return ", ".join(seen) or "none"


def check_placement(cfg: ExperimentConfig, nodes: list[dict]) -> None:
    """Refuse (ConfigError, naming the key) a placement no node of the cluster can satisfy: a
    label or a resource no node has, or labelled nodes too small for the workers pinned to them.
    Without this, Ray would leave the worker group pending forever."""
    pl = cfg.placement
    for r, sel in enumerate(pl.replica_labels):
        for k, v in sel.items():
            if not any(label_matches(v, n["labels"].get(k)) for n in nodes):
                raise ConfigError(f"placement.replica_labels[{r}]: no node of the cluster has the label {k}={v} "
                                  f"(node labels: {_describe(nodes, 'labels')})")
    for r, res in enumerate(pl.replica_resources):
        for k in res:
            if not any(k in n["resources"] for n in nodes):
                raise ConfigError(f"placement.replica_resources[{r}]: no node of the cluster has the resource "
                                  f"{k!r} (custom resources: {_describe(nodes, 'resources')})")
    for k, v in pl.broker_labels.items():
        if not any(label_matches(v, n["labels"].get(k)) for n in nodes):
            raise ConfigError(f"placement.broker_labels: no node of the cluster has the label {k}={v} "
                              f"(node labels: {_describe(nodes, 'labels')})")
    if pl.broker_labels or pl.broker_resources:
        if not any(selector_matches(pl.broker_labels, n["labels"])
                   and all(n["resources"].get(k, 0) >= a for k, a in pl.broker_resources.items()) for n in nodes):
            key = "placement.broker_resources" if pl.broker_resources else "placement.broker_labels"
            raise ConfigError(f"{key}: no node has the broker's labels {pl.broker_labels} and resources "
                              f"{pl.broker_resources} together")
    # the workers pinned to each selector must fit, together, on the nodes it matches
    for key, sel, need, count in _grouped(demands(cfg)):
        fit = [n for n in nodes if selector_matches(sel, n["labels"])]
        for name, amount in need.items():
            have = sum(n["resources"].get(name, 0.0) for n in fit)
            if amount * count > have + 1e-9:
                where = f"the nodes labelled {sel}" if sel else "the cluster"
                raise ConfigError(f"{key}: {count} worker(s) placed there need {amount * count:g} {name}, "
                                  f"{where} ha{'ve' if sel else 's'} {have:g}")


def _grouped(workers: list[tuple[str, dict, dict]]) -> list[tuple[str, dict, dict, int]]:
    """Workers with the same selector and resources, counted."""
    groups: dict = {}
    for key, sel, need in workers:
        ident = (tuple(sorted(sel.items())), tuple(sorted(need.items())))
        if ident in groups:
            groups[ident][3] += 1
        else:
            groups[ident] = [key, sel, need, 1]
    return [tuple(g) for g in groups.values()]


def concurrent_experiments(cfg: ExperimentConfig, nodes: list[dict]) -> int:
    """How many copies of this experiment the cluster holds at once (at least 1): the minimum over
    every resource it asks for (CPU, GPU, custom resources) and, for workers pinned by labels,
    over what the matching nodes hold. Tune's trial concurrency."""
    best = math.inf
    by_selector: dict = {}
    for _, sel, need in demands(cfg):
        agg = by_selector.setdefault(tuple(sorted(sel.items())), {})
        for name, amount in need.items():
            agg[name] = agg.get(name, 0.0) + amount
    totals: dict = {}
    for agg in by_selector.values():
        for name, amount in agg.items():
            totals[name] = totals.get(name, 0.0) + amount
    for name, amount in cfg.placement.broker_resources.items():
        totals[name] = totals.get(name, 0.0) + amount
    for name, amount in totals.items():  # the cluster as a whole
        have = sum(n["resources"].get(name, 0.0) for n in nodes)
        best = min(best, math.floor(have / amount + 1e-9))
    for sel, agg in by_selector.items():  # the nodes each selector may use
        if not sel:
            continue
        fit = [n for n in nodes if selector_matches(dict(sel), n["labels"])]
        for name, amount in agg.items():
            best = min(best, math.floor(sum(n["resources"].get(name, 0.0) for n in fit) / amount + 1e-9))
    return max(1, int(best)) if best != math.inf else 1
