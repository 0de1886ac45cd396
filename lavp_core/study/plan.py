"""A study's plan: the grid of (image, architecture, weights, attack loss, attack settings) jobs, each
identified by the SHA-256 of the canonical JSON of its full configuration (:attr:`Job.config_json`).

Only settings that can change a stored value enter a job's key (see :func:`keyed_solver_settings`),
so rerunning a study skips finished jobs and tuning an unused solver does not rerun anything. Job keys
of stored databases (e.g. the bundled ``assets/study/photos-random.sqlite``) depend on every byte of
that JSON: change it only with :data:`JOB_FORMAT`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from ..errors import ConfigError
from ..hashing import sha256_file, sha256_text
from ..hessian import SolverConfig

Flavour = Literal["exact", "paper"]
"""How a job's proxies were computed: ``exact`` (a certified solver, the dense Hessian by default) or
``paper`` (the paper's recipe: finite-difference power iterations within a recorded budget)."""
FLAVOURS: tuple[Flavour, ...] = get_args(Flavour)
ExactMethod = Literal["exact", "lanczos", "auto"]
"""The solver of the ``exact`` flavour: the dense Hessian, matrix-free Lanczos, or chosen by size."""
EXACT_METHODS: tuple[ExactMethod, ...] = get_args(ExactMethod)
JOB_FORMAT = 2  # part of every job key: bump when the meaning of a stored row changes
# 2: the paper recipe's and Lanczos' random start vectors are drawn per (loss, extreme), so a proxy no
#    longer depends on which other losses were requested (format-1 rows used one shared generator)


@dataclass(frozen=True)
class StudyConfig:
    """A study: the grid of jobs and how each job computes its proxies.

    Args:
        name: a label stored with the study and its rows (``report --study NAME``).
        dataset: registry name of the dataset; ``split`` its split (``val`` as in the paper).
        images: a count N (N images drawn without replacement by a generator seeded with ``seed``,
            sorted; every image when N is at least the split's size) or explicit image indices.
        archs: architecture names; ``weights``: ``"trained"``, ``"trained@E"`` (a training run's snapshot
            after epoch E), ``"random"`` or a checkpoint path, or several of them (a tuple): the grid then
            spans those model states.
        seed: seed of random weights, of the image draw and of the attacks' random starts.
        losses: the attack's matching losses (one job per loss).
        preset: an optimisation attack preset (``lavp-paper`` by default); ``steps``, ``restarts``,
            ``lr``, ``tv_weight`` and ``schedule`` (``none`` or ``step``) override its settings when given.
        proxy_losses: the losses whose Hessian eigenvalues are computed (default: ``losses``); the
            paper's ``fusion`` needs ``l2`` and ``cos``.
        flavours: which proxy flavours to compute: ``exact`` and/or ``paper`` (:data:`FLAVOURS`).
        exact_method: the solver of the ``exact`` flavour: ``exact`` (dense Hessian, certified),
            ``lanczos`` (matrix-free, for large inputs) or ``auto``.
        solver: eigen-solver settings, including the paper recipe's budget ``paper_iterations``.
        data_root: folder of on-disk datasets (CIFAR, image folders); not part of job identity.
        store_images: store the reconstruction and the ground truth as PNGs in each row.
    """

    name: str = "study"
    dataset: str = "photos"
    split: str = "val"
    images: int | tuple[int, ...] = 100
    archs: tuple[str, ...] = ("lenet", "resnet8")
    weights: str | tuple[str, ...] = "trained"
    seed: int = 0
    losses: tuple[str, ...] = ("l2", "cos")
    preset: str = "lavp-paper"
    steps: int | None = None
    restarts: int | None = None
    lr: float | None = None
    tv_weight: float | None = None
    schedule: str | None = None
    proxy_losses: tuple[str, ...] | None = None
    flavours: tuple[Flavour, ...] = FLAVOURS
    exact_method: ExactMethod = "exact"
    solver: SolverConfig = SolverConfig()
    data_root: str | None = None
    store_images: bool = True


@dataclass(frozen=True)
class Job:
    """One cell of the grid. ``key`` is the SHA-256 of ``config_json`` (the canonical JSON of every
    setting that affects the row); ``proxy_key`` identifies the proxy computation jobs may share."""

    key: str
    proxy_key: str
    config_json: str
    study: str
    dataset: str
    split: str
    index: int
    arch: str
    weights: str
    weights_sha256: str | None
    seed: int
    loss: str
    preset: str
    attack: object  # AttackConfig
    attack_seed: int
    proxy_losses: tuple[str, ...]
    flavours: tuple[Flavour, ...]
    exact_method: ExactMethod
    solver: SolverConfig
    data_root: str | None = None
    store_images: bool = True


@dataclass(frozen=True)
class StudyPlan:
    """A validated study: its resolved image indices and its jobs (grid order)."""

    config: StudyConfig
    images: tuple[int, ...]
    jobs: tuple[Job, ...]
    study_key: str
    config_json: str


def canonical_json(value: object) -> str:
    """Sorted-key, compact JSON: the text hashed into job keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False, default=_json_default)


def _json_default(value: object):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (tuple, set, frozenset)):
        return list(value)
    raise TypeError(f"cannot serialise {type(value).__name__}")


# The SolverConfig fields that can change a stored proxy value or its converged flag, per flavour and
# exact method. Only these enter a job's key, so that tuning another solver (say Lanczos, when the
# study uses the dense ``exact`` method) does not make finished jobs run again.
_SOLVER_FIELDS_ALWAYS = ("tol", "precision", "check_smoothness")
_SOLVER_FIELDS_EXACT: dict[ExactMethod, tuple[str, ...]] = {
    "exact": (),
    "lanczos": ("lanczos_ncv_max", "lanczos_ncv_min", "lanczos_max_products", "lanczos_min_products", "seed"),
    "auto": ("exact_max_dim", "lanczos_ncv_max", "lanczos_ncv_min", "lanczos_max_products",
             "lanczos_min_products", "seed"),
}
_SOLVER_FIELDS_PAPER = ("paper_iterations", "paper_seconds", "paper_fd_step", "seed")


def keyed_solver_settings(solver: SolverConfig, flavours: Sequence[Flavour], exact_method: ExactMethod) -> dict:
    """The solver settings that identify a job's proxies (see ``_SOLVER_FIELDS_*``)."""
    names = list(_SOLVER_FIELDS_ALWAYS)
    if "exact" in flavours:
        names += _SOLVER_FIELDS_EXACT[exact_method]
    if "paper" in flavours:
        names += _SOLVER_FIELDS_PAPER
    return {name: getattr(solver, name) for name in sorted(set(names))}


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the canonical JSON of ``parts`` (same parts, same seed, on every machine)."""
    return int(sha256_text(canonical_json(list(parts)))[:16], 16) >> 1


def study_config_dict(config: StudyConfig, images: Sequence[int]) -> dict:
    """The study configuration as a JSON-ready dict, with the image indices resolved."""
    out = dataclasses.asdict(config)
    out["images"] = list(images)
    if out["schedule"] is None:  # settings added later stay out of older studies' keys when unset
        del out["schedule"]
    # only the solver settings that can change a stored value identify the study (as for its jobs)
    out["solver"] = keyed_solver_settings(config.solver, config.flavours, config.exact_method)
    return out


def _names(value: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    names = tuple(str(v).strip() for v in value)
    if not names or any(not n for n in names):
        raise ConfigError(f"a study needs at least one {what} name (comma-separated), got {list(value)!r}")
    if len(set(names)) != len(names):
        raise ConfigError(f"each {what} may appear once in a study, got {list(names)}")
    return names


def _image_indices(config: StudyConfig, size: int) -> tuple[int, ...]:
    import torch

    images = config.images
    if isinstance(images, bool):
        raise ConfigError(f"images must be a count or a list of indices, got {images!r}")
    if isinstance(images, int):
        if images <= 0:
            raise ConfigError(f"a study needs at least one image, got images={images}")
        if images > size:
            raise ConfigError(f"a study of {images} images was asked for, but {config.dataset} {config.split} holds "
                              f"{size}: ask for at most {size} (or list the indices you want)")
        if images == size:
            return tuple(range(size))
        order = torch.randperm(size, generator=torch.Generator().manual_seed(int(config.seed)))
        return tuple(sorted(int(i) for i in order[:images]))
    indices = tuple(int(i) for i in images)
    if not indices:
        raise ConfigError("a study needs at least one image index")
    if len(set(indices)) != len(indices):
        raise ConfigError(f"image indices repeat: {list(indices)}")
    bad = [i for i in indices if not 0 <= i < size]
    if bad:
        raise ConfigError(f"image indices {bad} are out of range for {config.dataset} {config.split} "
                          f"({size} images: 0..{size - 1})")
    return indices
def plan_study(config: StudyConfig) -> StudyPlan:
    """Check every name and setting of ``config`` and expand its grid into jobs; nothing runs.

    Raises:
        ConfigError: an unknown dataset, architecture, loss, preset or solver, or a bad setting.
        DatasetError / CheckpointError / ModelError: a dataset or checkpoint that cannot be used.
    """
    from ..attacks import preset_config
    from ..data import load_dataset
    from ..losses import get_loss
    from ..models import checkpoint_for, model_spec
    from ..presets import get_preset, list_presets
    from ..scenario import ScenarioConfig, build_model

    if not isinstance(config, StudyConfig):
        raise ConfigError(f"expected a StudyConfig, got {type(config).__name__}")
    if not str(config.name).strip():
        raise ConfigError("a study needs a name")
    archs = _names(config.archs, "architecture")
    losses = _names(config.losses, "loss")
    for name in archs:
        model_spec(name)
    for name in losses:
        get_loss(name)
    proxy_losses = _names(config.proxy_losses if config.proxy_losses is not None else losses, "proxy loss")
    for name in proxy_losses:
        get_loss(name)
    flavours = _names(config.flavours, "proxy flavour")
    unknown = [f for f in flavours if f not in FLAVOURS]
    if unknown:
        raise ConfigError(f"unknown proxy flavours {unknown}: choose from {', '.join(FLAVOURS)}")
    flavours = tuple(f for f in FLAVOURS if f in flavours)
    if config.exact_method not in EXACT_METHODS:
        raise ConfigError(f"unknown exact method {config.exact_method!r}: choose one of {', '.join(EXACT_METHODS)}")
    if not isinstance(config.solver, SolverConfig):
        raise ConfigError(f"solver must be a SolverConfig, got {type(config.solver).__name__}")
    preset = get_preset(config.preset)
    if not preset.attack_kind.studied:
        studied = ", ".join(p.name for p in list_presets() if p.attack_kind.studied)
        raise ConfigError(f"preset {preset.name!r} is an attack of kind {preset.kind}, which studies do not run: "
                          f"choose one of {studied}")
    attacks = {loss: preset_config(config.preset, loss=loss, steps=config.steps, restarts=config.restarts,
                                   lr=config.lr, tv_weight=config.tv_weight, schedule=config.schedule)
               for loss in losses}
    weights_list = _names(config.weights, "weights")
    dataset = load_dataset(config.dataset, config.split, root=config.data_root)
    images = _image_indices(config, len(dataset))

    weights_sha: dict[tuple[str, str], str | None] = {}
    for arch in archs:  # build each model once: unknown or ill-fitting checkpoints fail here
        for weights in weights_list:
            scenario = ScenarioConfig(dataset=config.dataset, arch=arch, weights=weights, seed=config.seed,
                                      split=config.split, data_root=config.data_root)
            build_model(scenario, dataset.info)
            weights_sha[arch, weights] = (None if weights == "random" else
                                          sha256_file(checkpoint_for(arch, weights, config.dataset)))

    proxy_settings = {"losses": list(proxy_losses), "flavours": list(flavours),
                      "exact_method": config.exact_method if "exact" in flavours else None,
                      "solver": keyed_solver_settings(config.solver, flavours, config.exact_method)}
    jobs = []
    for index in images:
        attack_seed = derive_seed("attack-start", config.seed, config.dataset, config.split, index)
        for arch, weights in ((a, w) for a in archs for w in weights_list):
            scenario_part = {"format": JOB_FORMAT, "dataset": config.dataset, "split": config.split, "index": index,
                             "arch": arch, "weights": weights, "weights_sha256": weights_sha[arch, weights],
                             "seed": int(config.seed)}
            proxy_key = sha256_text(canonical_json({**scenario_part, "proxies": proxy_settings}))
            for loss in losses:
                job_config = {**scenario_part, "loss": loss, "preset": preset.name,
                              "attack": dataclasses.asdict(attacks[loss]), "attack_seed": attack_seed,
                              "proxies": proxy_settings}
                text = canonical_json(job_config)
                jobs.append(Job(sha256_text(text), proxy_key, text, str(config.name), config.dataset, config.split,
                                index, arch, weights, weights_sha[arch, weights], int(config.seed), loss, preset.name,
                                attacks[loss], attack_seed, proxy_losses, flavours, config.exact_method,
                                config.solver, config.data_root, config.store_images))
    config_json = canonical_json(study_config_dict(config, images))
    return StudyPlan(config, images, tuple(jobs), sha256_text(config_json), config_json)


def parse_images(text: str) -> int | tuple[int, ...]:
    """``"100"`` → a count of 100 images; ``"0,5,9"`` (or ``"5,"``) → those indices."""
    text = text.strip()
    try:
        if "," in text:
            return tuple(int(part) for part in text.split(",") if part.strip())
        return int(text)
    except ValueError as exc:
        raise ConfigError(f"--images takes a count (e.g. 100) or comma-separated indices (e.g. 0,5,9), "
                          f"got {text!r}") from exc

