"""Config: presets load, overrides are typed, every invalid value is refused by key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ray_codistill.config import ConfigError, ExperimentConfig, load_config, parse_override

from conftest import CONFIGS, ROOT


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load(preset):
    cfg = load_config(CONFIGS / preset)
    assert cfg.name and cfg.steps > 0


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "smoke.yaml", ["codistill.alpha=0.25", "use_gpu=true", "optim.schedule=step",
                                               "optim.milestones=[10, 20]", "codistill.max_staleness=null"])
    assert cfg.codistill.alpha == 0.25 and cfg.use_gpu is True
    assert cfg.optim.milestones == [10, 20] and cfg.codistill.max_staleness is None
    assert parse_override("steps=5") == ("steps", 5)


def test_fields_override_yaml_and_replace_revalidates():
    cfg = load_config(CONFIGS / "smoke.yaml", name="other", storage_path="/tmp/x")
    assert (cfg.name, cfg.storage_path) == ("other", "/tmp/x")
    assert cfg.replace(method="allreduce").num_models == 1
    assert cfg.replace(method="allreduce").workers_per_model == 2
    with pytest.raises(ConfigError, match="replicas"):
        cfg.replace(replicas=1)


def test_independent_never_distills():
    cfg = ExperimentConfig(method="independent")
    assert cfg.codistill.alpha > 0 and not cfg.distills


INVALID = [  # (override, the key the error names, words of what is allowed)
    ("method=sync", "method", "codistill, allreduce, independent"),
    ("optim.name=rmsprop", "optim.name", "sgd, adam"),
    ("optim.schedule=linear", "optim.schedule", "constant, cosine, step"),
    ("codistill.distance=l1", "codistill.distance", "kl, mse"),
    ("codistill.exchange=grads", "codistill.exchange", "logits, weights"),
    ("codistill.teacher_rule=median", "codistill.teacher_rule", "mean_logits, mean_probs, random_peer"),
    ("data.name=imagenet", "data.name", "mnist1d, synthetic, imagefolder, cifar10"),
    ("replicas=1", "replicas", "codistill needs >= 2"),
    ("steps=0", "steps", ">= 1"),
    ("batch_size=-3", "batch_size", ">= 1"),
    ("cpus_per_worker=0", "cpus_per_worker", "> 0"),
    ("optim.lr=0", "optim.lr", "> 0"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay", ">= 0"),
    ("optim.weight_decay=much", "optim.weight_decay", "a number"),
    ("optim.momentum=1.5", "optim.momentum", "[0, 1)"),
    ("optim.schedule=step", "optim.milestones", "required"),
    ("optim.milestones=[20, 10]", "optim.milestones", "increasing"),
    ("data.val_fraction=1.5", "data.val_fraction", "(0, 1)"),
    ("data.name=cifar10", "data.root", "required"),
    ("codistill.alpha=-1", "codistill.alpha", ">= 0"),
    ("codistill.temperature=0", "codistill.temperature", "> 0"),
    ("codistill.exchange_every=0", "codistill.exchange_every", ">= 1"),
    ("codistill.max_staleness=-1", "codistill.max_staleness", ">= 0"),
    ("use_gpu=3", "use_gpu", "true or false"),
    ("steps=ten", "steps", "an integer"),
    ("name=a/b", "name", "letters"),
    ("bogus=1", "bogus", "unknown key"),
    ("optim.betas=1", "optim.betas", "unknown key"),
    ("nosection.key=1", "nosection", "unknown key"),
    ("data.test_fraction=0", "data.test_fraction", "(0, 1)"),
    ("data.num_samples=10", "data.num_samples", ">= 20"),
    ("data.num_classes=1", "data.num_classes", ">= 2"),
    ("data.length=0", "data.length", ">= 1"),
    ("data.image_size=4", "data.image_size", ">= 8"),
    ("data.num_workers=-1", "data.num_workers", ">= 0"),
    ("model.name=''", "model.name", "must not be empty"),
    ("model.hidden=0", "model.hidden", ">= 1"),
    ("model.channels=0", "model.channels", ">= 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps", ">= 0"),
    ("optim.gamma=0", "optim.gamma", "(0, 1]"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio", "[0, 1]"),
    ("optim.milestones=[0, 10]", "optim.milestones", "positive"),
    ("codistill.burn_in=-1", "codistill.burn_in", ">= 0"),
    ("codistill.ramp_steps=-1", "codistill.ramp_steps", ">= 0"),
    ("codistill.exchange_batches=0", "codistill.exchange_batches", ">= 1"),
    ("codistill.probe_size=0", "codistill.probe_size", ">= 1"),
    ("codistill.probe_every=-1", "codistill.probe_every", ">= 0"),
    ("codistill.wait_for_peers_s=-1", "codistill.wait_for_peers_s", ">= 0"),
    ("codistill.fetch_timeout_s=0", "codistill.fetch_timeout_s", "> 0"),
    ("workers_per_replica=0", "workers_per_replica", ">= 1"),
    ("eval_batch_size=0", "eval_batch_size", ">= 1"),
    ("eval_every=0", "eval_every", ">= 1"),
    ("log_every=0", "log_every", ">= 1"),
    ("checkpoint_every=-5", "checkpoint_every", ">= 0"),
    ("replica_max_failures=-2", "replica_max_failures", ">= 0"),
    ("storage_path=''", "storage_path", "must not be empty"),
    ("codistill.topk=0", "codistill.topk", ">= 1"),
    ("codistill.broker_shards=0", "codistill.broker_shards", ">= 1"),
    ("codistill.broker_niceness=20", "codistill.broker_niceness", "-20..19 or null"),
    ("node_wait_s=0", "node_wait_s", "> 0 or null"),
    ("time_budget_s=0", "time_budget_s", "> 0 or null"),
    ("data.block_size=0", "data.block_size", ">= 1"),
    ("data.train_chars=0", "data.train_chars", ">= 1 or null"),
    ("data.test_fraction=0.95", "data.test_fraction", "val_fraction + test_fraction is"),
    ("model.dropout=1", "model.dropout", "[0, 1)"),
    ("model.n_embd=10", "model.n_embd", "multiple of model.n_head (4)"),
    ("model.n_layer=0", "model.n_layer", ">= 1"),
    ("model.n_head=0", "model.n_head", ">= 1"),
    ("optim.beta2=1", "optim.beta2", "(0, 1)"),
    ("optim.name=lamb", "optim.name", "sgd, adam, adamw"),
    ("codistill.teacher_replica=-1", "codistill.teacher_replica", ">= 0"),
    ("method=distill", "codistill.teacher_from", "required for method=distill"),
    ("replica_overrides=[{}, {}, {}]", "replica_overrides", "3 entries for 2 replicas"),
    ("placement.strategy=RANDOM", "placement.strategy", "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
    ("placement.replica_labels=[{node: a}]", "placement.replica_labels", "one per replica"),
    ("placement.replica_labels=[{node: ''}, {}]", "placement.replica_labels", "non-empty strings"),
    ("placement.replica_labels=[{node: 1}, {}]", "placement.replica_labels[0]", "a string"),
    ("placement.replica_resources=[{a: 1}]", "placement.replica_resources", "one per replica"),
    ("placement.replica_resources=[{a: 0}, {}]", "placement.replica_resources", "> 0"),
    ("placement.replica_resources=[{GPU: 1}, {}]", "placement.replica_resources", "custom resources only"),
    ("placement.broker_labels={node: ''}", "placement.broker_labels", "non-empty strings"),
    ("placement.broker_resources={x: -1}", "placement.broker_resources", "> 0"),
    ("placement.broker_resources={CPU: 1}", "placement.broker_resources", "custom resources only"),
]


@pytest.mark.parametrize("override, key, allowed", INVALID)
def test_invalid_values_name_the_key(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "smoke.yaml", [override])
    assert str(err.value).startswith(key + ":"), str(err.value)
    assert allowed in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_allreduce_refuses_resources_that_differ_by_replica():
    with pytest.raises(ConfigError, match="^placement.replica_resources: allreduce is one worker group"):
        load_config(CONFIGS / "smoke.yaml", ["method=allreduce", "placement.replica_resources=[{a: 1}, {b: 1}]"])


def test_teacher_rules_and_the_distance_they_need():
    assert load_config(CONFIGS / "smoke.yaml").codistill.teacher_rule == "mean_logits"  # today's rule
    for rule in ("mean_logits", "mean_probs", "random_peer"):
        for exchange in ("logits", "weights"):
            cfg = load_config(CONFIGS / "smoke.yaml", [f"codistill.teacher_rule={rule}",
                                                       f"codistill.exchange={exchange}"])
            assert cfg.codistill.teacher_rule == rule
    for rule in ("mean_logits", "random_peer"):  # a logits teacher: mse on logits is fine
        assert load_config(CONFIGS / "smoke.yaml", [f"codistill.teacher_rule={rule}",
                                                    "codistill.distance=mse"]).codistill.distance == "mse"
    with pytest.raises(ConfigError, match="^codistill.teacher_rule: mean_probs needs codistill.distance=kl"):
        load_config(CONFIGS / "smoke.yaml", ["codistill.teacher_rule=mean_probs", "codistill.distance=mse"])


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 reads 1e-4 as a string; weight decays are written that way
    assert load_config(CONFIGS / "smoke.yaml", ["optim.weight_decay=1e-4"]).optim.weight_decay == 1e-4


def test_every_checked_key_has_a_row_in_the_invalid_values_table():
    """The table above must grow with the config: each key config.py validates is refused once."""
    import re

    import ray_codistill.config as config_module
    source = Path(config_module.__file__).read_text()
    # calls, not the definitions; the key is the first string after a comma on the call's line
    # (a condition may hold strings too)
    checked = set(re.findall(r'(?<!def )_(?:check|choice)\([^\n]*?,\s*"([a-z_.]+)"', source))
    table = {key for _, key, _ in INVALID}
    assert checked and checked <= table, f"no invalid-value row for: {sorted(checked - table)}"


def test_the_configuration_reference_is_current():
    """docs/configuration.md is generated from config.py (fields, defaults, comments)."""
    from ray_codistill.config_reference import COMMAND, reference
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert reference() == committed, (f"docs/configuration.md does not match config.py: regenerate it with "
                                      f"`{COMMAND}` from the repository root")


def test_the_reference_lists_every_key_with_a_comment_and_its_default():
    """Every field has its comment, and the reference's keys and defaults, passed back as `--set`
    overrides, build the default config: the keys are the ones users write, the defaults true."""
    from ray_codistill.config_reference import sections, yaml_value
    keys = [k for section in sections() for k in section.keys]
    assert [k.key for k in keys if not k.comment] == []
    assert load_config(overrides=[f"{k.key}={yaml_value(k.default)}" for k in keys]) == ExperimentConfig()
    assert {"name", "codistill.alpha", "placement.broker_labels", "data.root"} <= {k.key for k in keys}
