"""Studies: a grid of (image, architecture, weights, attack loss, attack settings) jobs run into a
results database, and the paper's evaluation of the proxies on what was stored.

A *job* attacks one image on one model with one matching loss (best of the preset's restarts), scores
the reconstruction (MSE, PSNR, SSIM, LPIPS where available), and computes every proxy at the ground
truth twice: by an exact solver (flavour ``exact``: the dense float64 Hessian by default) and by the
paper's recipe (flavour ``paper``: finite-difference power iterations within a recorded budget,
``SolverConfig.paper_iterations``, 100 for each extreme by default). Proxies do not depend on the attack
loss, so jobs that share an image and a model compute them once and share them (``proxies_from``
names the job that computed them).

Each job is identified by the SHA-256 of the canonical JSON of its full configuration
(:attr:`Job.config_json`): rerunning a study skips finished jobs and retries failed ones. The attack's
random starts come from a ``torch.Generator`` seeded from (seed, dataset, split, image index), so
every loss and architecture starts from the same candidates for a given image and results do not
depend on which worker ran a job or when.

Modules, each using only those above it in this list:

* :mod:`.plan`: :class:`StudyConfig` → :func:`plan_study` → :class:`StudyPlan` of :class:`Job` (keys).
* :mod:`.job`: :func:`execute_job`, one job's attack, scores and proxies as rows to store.
* :mod:`.leases`: :class:`JobLeases`, a runner's claims on jobs, so runners sharing a database compute
  each job once.
* :mod:`.executors`: :func:`run_study` and the executor registry (``local``: this machine's cores;
  ``ray``: a Ray cluster, :mod:`.ray_executor`, imported only when a study runs on it).
* :mod:`.results`: :func:`load_results`, the stored jobs as one DataFrame.
* :mod:`.analysis`: σ_S (:func:`spearman_table`), recipe agreement, findings, rankings (Figure 1b/1c)
  and :func:`pick_disagreeing_images`.
* :mod:`.report`: Table 1 / Table 3 layouts and the Markdown / CSV / JSON report.
"""

from __future__ import annotations

from ..hashing import sha256_text
from ..system import available_cores
from .analysis import (
    LOSS_LABELS,
    MEAN_ARCH,
    SCORES,
    findings,
    kendall,
    loss_label,
    pick_disagreeing_images,
    rankings,
    recipe_agreement,
    spearman,
    spearman_table,
)
from .executors import (
    Executor,
    StudySummary,
    default_workers,
    get_executor,
    list_executors,
    register_executor,
    run_local,
    run_study,
)
from .job import JobOutcome, SharedProxies, execute_job, failed_outcome, proxy_rows
from .leases import HEARTBEAT_SECONDS, LEASE_SECONDS, JobLeases, Lease, lease_owner, read_leases
from .plan import (
    EXACT_METHODS,
    FLAVOURS,
    JOB_FORMAT,
    ExactMethod,
    Flavour,
    Job,
    StudyConfig,
    StudyPlan,
    canonical_json,
    derive_seed,
    keyed_solver_settings,
    parse_images,
    plan_study,
    study_config_dict,
)
from .report import format_rankings, format_report, report_data, summarise, table1, table3
from .results import CELL, check_one_configuration, load_results, proxy_column, proxy_names

__all__ = [
    # plan
    "Flavour", "FLAVOURS", "ExactMethod", "EXACT_METHODS", "JOB_FORMAT", "StudyConfig", "Job", "StudyPlan",
    "plan_study", "parse_images", "canonical_json", "derive_seed", "keyed_solver_settings", "study_config_dict",
    "sha256_text",
    # one job
    "SharedProxies", "JobOutcome", "execute_job", "failed_outcome", "proxy_rows",
    # running
    "StudySummary", "run_study", "Executor", "register_executor", "get_executor", "list_executors", "run_local",
    "default_workers", "available_cores",
    # leases
    "JobLeases", "Lease", "lease_owner", "read_leases", "LEASE_SECONDS", "HEARTBEAT_SECONDS",
    # results
    "load_results", "proxy_column", "proxy_names", "check_one_configuration", "CELL",
    # analysis
    "SCORES", "MEAN_ARCH", "LOSS_LABELS", "loss_label", "spearman", "kendall", "spearman_table",
    "recipe_agreement", "findings", "rankings", "pick_disagreeing_images",
    # report
    "table1", "table3", "report_data", "format_report", "format_rankings", "summarise",
]
