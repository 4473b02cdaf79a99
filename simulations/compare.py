"""The comparison: methods x multi-center setups x seeds, each a Flower simulation, then a report.

Privacy matching (the point of a fair comparison):

- ``match="noise"`` (default): every DP method gets the same ``noise_multiplier``,
  ``batch_size`` (so the same ``sample_rate`` per site, since all methods share one
  manifest per setup and seed) and the same rounds and local epochs. Equal
  ``(noise_multiplier, sample_rate, steps)`` give equal per-site epsilon for every clipping
  and sparsification variant, because each bounds the per-example sensitivity by
  ``max_grad_norm``.
- ``match="epsilon"``: every DP method calibrates its noise (``calibrate_noise``) to the same
  ``target_epsilon``.
- ``sweep_epsilons``: one calibrated run group per target epsilon (noise calibrated per
  value); the non-private reference runs once, outside the sweep.

Resuming: a run whose ``status.json`` marks it complete is skipped, an unfinished run with a
``checkpoint.pt`` continues from it (``resume``), and any other run starts over. A finished
run whose saved configuration differs from the requested one is an error, so a changed
setting never mixes with old results.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from common import atomic, results
from common.config import METHODS, RunConfig
from simulations.summary import (
    COMPARISON_DIR,
    MANIFEST_DIR,
    METHOD_FOLDERS,
    PLAN_FILE,
    RUN_KEYS,
    SUMMARY_CSV,
    SUMMARY_MD,
    claims,
    claims_markdown,
    early_stops,
    final_per_run,
    load_rounds,
    report_runs,
    run_name,
    summarize,
    summary_markdown,
)

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("rs", "automatic")
MATCH_MODES = ("noise", "epsilon")

SKIP, RESUME, START = "skip", "resume", "start"
"""What :func:`resume_action` decides for a run folder."""

_UNCOMPARED_KEYS = frozenset(
    {"resume", "output_dir", "manifest", "cache_dir", "site_dir", "init_weights", "round_timeout"}
)
"""Run settings that may differ between a saved run and a resumed comparison: paths (the
runner makes them absolute) and operational limits. The dataset path is compared after
resolving it, so results of one dataset are never reported as another's."""

Runner = Callable[..., Path]


@dataclass(frozen=True)
class PlannedRun:
    """One federated run of the comparison: a method on one setup and seed."""

    method: str
    setup: str
    seed: int
    sweep_epsilon: float | None = None

    @property
    def name(self) -> str:
        """The run folder name, ``<setup>-seed<k>[-eps<e>]``."""
        return run_name(self.setup, self.seed, self.sweep_epsilon)

    def folder(self, outputs: Path) -> Path:
        """Return the run folder under ``outputs``."""
        return Path(outputs) / METHOD_FOLDERS[self.method] / self.name

    def label(self) -> str:
        """``<method folder>/<run name>``, as the log names a run."""
        return f"{METHOD_FOLDERS[self.method]}/{self.name}"


@dataclass(frozen=True)
class CompareSpec:
    """Everything one comparison needs, validated at construction.

    Attributes:
        base: settings shared by every run; ``method``, ``seed``, ``output_dir``,
            ``manifest``, ``data_dir``, ``calibrate_noise`` and ``resume`` are set per run.
        data_dir: dataset root shared by all runs.
        outputs: the outputs folder (method folders, ``manifests/``, ``comparison/``).
        methods: methods to compare, each one of :data:`common.config.METHODS`.
        setups: site setups (see :mod:`common.sites`), one manifest per setup and seed.
        seeds: seeds; seed ``k`` draws the partition and seeds training of every method.
        match: ``noise`` or ``epsilon``, see the module notes.
        sweep_epsilons: target epsilons to sweep (empty: no sweep).
        site_options: extra settings of the site partition (e.g. ``alpha``).
        run_timeout: seconds one run may take before it is stopped (None: the runner's default).
    """

    base: RunConfig
    data_dir: Path
    outputs: Path
    methods: tuple[str, ...] = DEFAULT_METHODS
    setups: tuple[str, ...] = ("iid",)
    seeds: tuple[int, ...] = (0,)
    match: str = "noise"
    sweep_epsilons: tuple[float, ...] = ()
    site_options: Mapping[str, Any] = field(default_factory=dict)
    run_timeout: float | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"methods must be a non-empty selection of {', '.join(METHODS)}; got "
                f"{list(self.methods)}"
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods are listed twice: {list(self.methods)}")
        if self.match not in MATCH_MODES:
            raise ValueError(f"match must be one of {', '.join(MATCH_MODES)}; got {self.match!r}")
        if not self.setups or len(set(self.setups)) != len(self.setups):
            raise ValueError(f"setups must be non-empty and distinct; got {list(self.setups)}")
        distinct = len(set(self.seeds)) == len(self.seeds)
        if not self.seeds or any(s < 0 for s in self.seeds) or not distinct:
            raise ValueError(f"seeds must be distinct integers >= 0; got {list(self.seeds)}")
        bad = [e for e in self.sweep_epsilons if not (e > 0 and math.isfinite(e))]
        if bad:
            raise ValueError(f"target epsilons must be finite and > 0; got {bad}")
        for setup in self.setups:
            # Builds and discards the settings so a bad setup or option fails before any run.
            self.site_settings(setup, self.seeds[0])

    def site_settings(self, setup: str, seed: int):
        """Return the ``SiteSettings`` of ``setup`` and ``seed``; raise ValueError if invalid."""
        from common.sites import SiteSettings

        # The setup, site count, seed and batch size come from the comparison itself.
        own = {"setup", "num_sites", "seed", "expected_batch_size"}
        allowed = sorted(f.name for f in dataclasses.fields(SiteSettings) if f.name not in own)
        unknown = sorted(set(self.site_options) - set(allowed))
        if unknown:
            names = ", ".join(name.replace("_", "-") for name in unknown)
            raise ValueError(
                f"unknown --site-option {names}; valid options: "
                f"{', '.join(name.replace('_', '-') for name in allowed)}"
            )
        return SiteSettings(
            setup=setup,
            num_sites=self.base.num_sites,
            seed=seed,
            expected_batch_size=self.base.batch_size,
            **self.site_options,
        )

    @property
    def num_sites(self) -> int:
        """Number of sites of every run."""
        return self.base.num_sites


def plan_runs(spec: CompareSpec) -> list[PlannedRun]:
    """Return the runs of ``spec`` in execution order.

    All methods of one (setup, seed) run next to each other, seeds in order, so the first
    finished runs already give a complete comparison at seed 0.
    """
    runs = []
    epsilons: tuple[float | None, ...] = spec.sweep_epsilons or (None,)
    for setup in spec.setups:
        for seed in spec.seeds:
            for method in spec.methods:
                if method == "none":
                    runs.append(PlannedRun(method, setup, seed))
                    continue
                runs.extend(PlannedRun(method, setup, seed, eps) for eps in epsilons)
    return runs


def run_config_for(spec: CompareSpec, run: PlannedRun, manifest: Path) -> RunConfig:
    """Return the resolved settings of ``run``: the shared ones plus the run's own."""
    if run.method == "none":
        calibrate, target = False, spec.base.target_epsilon
    elif run.sweep_epsilon is not None:
        calibrate, target = True, run.sweep_epsilon
    else:
        calibrate, target = spec.match == "epsilon", spec.base.target_epsilon
    return spec.base.replace(
        method=run.method,
        seed=run.seed,
        data_dir=str(spec.data_dir),
        manifest=str(manifest),
        output_dir=str(run.folder(spec.outputs)),
        calibrate_noise=calibrate,
        target_epsilon=target,
        resume=False,
    )


def resume_action(folder: Path) -> str:
    """Return :data:`SKIP` (finished run), :data:`RESUME` (checkpoint) or :data:`START`."""
    status_file = folder / results.STATUS_FILE
    if status_file.is_file():
        try:
            if json.loads(status_file.read_text(encoding="utf-8")).get("complete") is True:
                return SKIP
        except json.JSONDecodeError:
            log.warning("%s is not valid JSON; the run is treated as unfinished", status_file)
    if (folder / results.CHECKPOINT_FILE).is_file():
        return RESUME
    return START


def check_saved_config(folder: Path, config: RunConfig) -> None:
    """Raise ValueError when the run in ``folder`` was made with other settings than ``config``.

    Every setting but paths and limits (:data:`_UNCOMPARED_KEYS`) is compared. A calibrated
    noise multiplier is left out, because the saved one is the calibrated value.
    """
    saved_file = folder / results.CONFIG_FILE
    if not saved_file.is_file():
        return
    saved = {k.replace("-", "_"): v for k, v in json.loads(saved_file.read_text()).items()}
    wanted = {k.replace("-", "_"): v for k, v in config.to_run_config().items()}
    skip = set(_UNCOMPARED_KEYS)
    if config.calibrate_noise:
        skip.add("noise_multiplier")
    differences = [
        f"{key.replace('_', '-')}: saved {saved[key]!r}, requested {value!r}"
        for key, value in wanted.items()
        if key not in skip
        and key in saved
        and not (_same_path if key == "data_dir" else _same_value)(saved[key], value)
    ]
    if differences:
        raise ValueError(
            f"the run in {folder} was made with other settings ({'; '.join(differences)}); "
            "choose another --out folder, or delete that run folder to redo it"
        )


def _same_path(saved: Any, wanted: Any) -> bool:
    if not saved or not wanted:
        return str(saved or "") == str(wanted or "")
    return Path(str(saved)).expanduser().resolve() == Path(str(wanted)).expanduser().resolve()


def _same_value(saved: Any, wanted: Any) -> bool:
    if isinstance(wanted, bool) or isinstance(saved, bool):
        return str(saved).lower() == str(wanted).lower()
    if isinstance(wanted, (int, float)) and isinstance(saved, (int, float)):
        return math.isclose(float(saved), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    return str(saved) == str(wanted)


def manifest_path(spec: CompareSpec, setup: str, seed: int) -> Path:
    """Return where the sites manifest of ``setup`` and ``seed`` lives."""
    return Path(spec.outputs) / MANIFEST_DIR / f"{setup}-seed{seed}.csv"


def check_saved_manifest(spec: CompareSpec, setup: str, seed: int) -> bool:
    """Return whether the manifest of ``setup`` and ``seed`` exists and suits ``spec``.

    Raises ValueError when it exists but was made with other partition settings or
    from another dataset.
    """
    from common.sites import read_manifest_sidecar

    path = manifest_path(spec, setup, seed)
    if not path.is_file():
        return False
    sidecar = read_manifest_sidecar(path) or {}
    saved = sidecar.get("settings") or {}
    wanted = json.loads(json.dumps(spec.site_settings(setup, seed).to_dict()))
    if saved != wanted:
        changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, requested {wanted.get(k)!r}" for k in changed)
        raise ValueError(
            f"manifest {path} was made with other partition settings ({details}); "
            "choose another --out folder or delete it"
        )
    source = sidecar.get("source")
    if source and not _same_path(source, spec.data_dir):
        raise ValueError(
            f"manifest {path} was made from the dataset {source}, not {spec.data_dir}; "
            "choose another --out folder for another dataset"
        )
    return True


def rerun_problem(spec: CompareSpec, run: PlannedRun) -> str | None:
    """Return why running the comparison would reject ``run``'s saved state, or None.

    The same checks as :func:`run_comparison`, without writing anything: the saved
    manifest's partition settings and dataset, and a saved run's settings.
    """
    try:
        check_saved_manifest(spec, run.setup, run.seed)
        folder = run.folder(spec.outputs)
        if resume_action(folder) != START:
            check_saved_config(folder, run_config_for(spec, run, manifest_path(spec, run.setup, run.seed)))
    except ValueError as error:
        return str(error)
    return None


class ManifestBuilder:
    """Write, or reuse, the sites manifest ``manifests/<setup>-seed<k>.csv`` of a setup and seed.

    All methods of one setup and seed share the manifest, so they train on the same sites
    with the same sample rates. The dataset's records are read once per comparison. An
    existing manifest is reused only when its saved partition settings equal the
    requested ones.
    """

    def __init__(self) -> None:
        self._frames: dict[Path, Any] = {}

    def __call__(self, spec: CompareSpec, setup: str, seed: int) -> Path:
        from common.sites import partition_records, write_manifest

        path = manifest_path(spec, setup, seed)
        if check_saved_manifest(spec, setup, seed):
            return path
        settings = spec.site_settings(setup, seed)
        frame = self._records(Path(spec.data_dir))
        files = write_manifest(partition_records(frame, settings, source=str(spec.data_dir)),
                               path, source=str(spec.data_dir))
        log.info("wrote the %s manifest for seed %d: %s", setup, seed, files.manifest)
        return files.manifest

    def _records(self, data_dir: Path):
        if data_dir not in self._frames:
            from common.data import load_dataset

            self._frames[data_dir] = load_dataset(data_dir).frame()
        return self._frames[data_dir]


# ----- the comparison loop --------------------------------------------------------------------


def run_comparison(
    spec: CompareSpec,
    *,
    prepare_manifest: Callable[[CompareSpec, str, int], Path] | None = None,
    runner: Runner | None = None,
) -> list[Path]:
    """Run every planned run not finished yet, then write the report; return the report files.

    ``prepare_manifest(spec, setup, seed)`` returns the sites manifest of one setup and seed
    (a :class:`ManifestBuilder` by default). ``runner`` runs one federated job
    (:func:`simulations.flower_run.run_federated` by default). A failing run is logged and
    the others go on; the report covers the finished runs, then RuntimeError names the
    failed ones.
    """
    if runner is None:
        from simulations.flower_run import run_federated as runner
    prepare_manifest = prepare_manifest or ManifestBuilder()
    plan = plan_runs(spec)
    ledger = _PlanFile(spec, plan)
    _log_start(spec, plan)
    timer = TimeLeft(len(plan))
    failures = []
    manifests: dict[tuple[str, int], Path] = {}
    for index, run in enumerate(plan, 1):
        counter = f"[{index}/{len(plan)}] {run.label()}"
        key = (run.setup, run.seed)
        if key not in manifests:
            manifests[key] = prepare_manifest(spec, run.setup, run.seed)
        config = run_config_for(spec, run, manifests[key])
        action = resume_action(run.folder(spec.outputs))
        if action != START:
            check_saved_config(run.folder(spec.outputs), config)
        if action == SKIP:
            log.info("%s finished earlier: skipped", counter)
            ledger.update(run, state="complete")
            timer.skip()
            continue
        verb = "resuming from its checkpoint" if action == RESUME else "starting"
        log.info("%s: %s", counter, verb)
        started = time.monotonic()
        try:
            _run_one(spec, run, config.replace(resume=action == RESUME), runner)
        except RuntimeError as error:
            log.error("%s failed: %s", run.label(), error)
            failures.append(run.label())
            ledger.update(run, state="failed", seconds=time.monotonic() - started)
            timer.skip()
            continue
        seconds = time.monotonic() - started
        ledger.update(run, state="complete", seconds=seconds)
        timer.finished(seconds)
        log.info("%s finished in %.0f s; %s", counter, seconds, timer.describe())
    written = write_report(spec.outputs) if _any_finished(spec, plan) else []
    if failures:
        raise RuntimeError(
            f"{len(failures)} of {len(plan)} runs failed: {', '.join(failures)}; their logs are "
            "in each run folder (flower.log); rerun the same command to retry them"
        )
    return written


def _run_one(spec: CompareSpec, run: PlannedRun, config: RunConfig, runner: Runner) -> None:
    """Run one federated job under a progress bar; RuntimeError when it fails."""
    with RunProgress(run.folder(spec.outputs), total=config.num_server_rounds,
                     label=run.label()) as bar:
        runner(config, num_sites=spec.num_sites, timeout=spec.run_timeout, on_line=bar.poll)


def _log_start(spec: CompareSpec, plan: list[PlannedRun]) -> None:
    done = sum(resume_action(run.folder(spec.outputs)) == SKIP for run in plan)
    log.info(
        "comparison of %s on %s, seeds %s, %d sites, privacy matched by %s%s: %d runs "
        "(%d finished earlier) in %s, data %s",
        ", ".join(spec.methods), ", ".join(spec.setups), ", ".join(map(str, spec.seeds)),
        spec.num_sites, "calibrated target epsilon" if spec.sweep_epsilons else spec.match,
        f" ({', '.join(f'{e:g}' for e in spec.sweep_epsilons)})" if spec.sweep_epsilons else "",
        len(plan), done, spec.outputs, spec.data_dir,
    )
    per_run = {"method", "seed", "data-dir", "manifest", "output-dir", "resume", "calibrate-noise"}
    shared = {k: v for k, v in spec.base.to_run_config().items() if k not in per_run}
    log.info("settings shared by every run: %s", shared)


def _any_finished(spec: CompareSpec, plan: list[PlannedRun]) -> bool:
    return any(resume_action(run.folder(spec.outputs)) == SKIP for run in plan)


class _PlanFile:
    """``comparison/plan.json``: the planned runs, their state and measured seconds."""

    def __init__(self, spec: CompareSpec, plan: list[PlannedRun]) -> None:
        self.path = Path(spec.outputs) / COMPARISON_DIR / PLAN_FILE
        previous = self._read()
        self.runs = {}
        for run in plan:
            entry = previous.get(run.label(), {})
            self.runs[run.label()] = {
                "method": run.method,
                "setup": run.setup,
                "seed": run.seed,
                "sweep_epsilon": run.sweep_epsilon,
                "folder": run.label(),
                "state": entry.get("state", "planned"),
                "seconds": entry.get("seconds"),
            }
        self.header = {
            "methods": list(spec.methods),
            "setups": list(spec.setups),
            "seeds": list(spec.seeds),
            "match": spec.match,
            "sweep_epsilons": list(spec.sweep_epsilons),
            "num_sites": spec.num_sites,
            "data_dir": str(spec.data_dir),
            "site_options": dict(spec.site_options),
            "base_config": spec.base.to_run_config(),
        }
        self._write()

    def update(self, run: PlannedRun, *, state: str, seconds: float | None = None) -> None:
        entry = self.runs[run.label()]
        entry["state"] = state
        if seconds is not None:
            entry["seconds"] = round(seconds, 1)
        self._write()

    def _read(self) -> dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            return {r["folder"]: r for r in json.loads(self.path.read_text())["runs"]}
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s is unreadable; it is rewritten from the current plan", self.path)
            return {}

    def _write(self) -> None:
        atomic.write_json(self.path, {**self.header, "runs": list(self.runs.values())})


# ----- progress -----------------------------------------------------------------------------


class RunProgress:
    """A tqdm bar over the rounds of one run, advanced from the run folder's ``rounds.csv``.

    :meth:`poll` is cheap to call on every log line: it rereads ``rounds.csv`` at most once
    per :data:`POLL_SECONDS`. Reading the file rather than parsing log lines keeps the bar
    true to what the server has saved.
    """

    POLL_SECONDS = 1.0

    def __init__(self, folder: Path, *, total: int, label: str) -> None:
        self.rounds_file = Path(folder) / results.ROUNDS_FILE
        self.total = total
        self.label = label
        self._last_poll = 0.0
        self._bar = None

    def __enter__(self) -> "RunProgress":
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Log lines go through tqdm.write while the bar is shown, so they do not cut it.
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        self._bar = tqdm(total=self.total, desc=self.label, unit="round", leave=True)
        self._bar.update(self.rounds_done())
        return self

    def __exit__(self, *exc) -> None:
        self.poll(force=True)
        self._bar.close()
        self._redirect.__exit__(*exc)

    def poll(self, line: str = "", *, force: bool = False) -> None:
        """Advance the bar to the number of rounds saved so far."""
        now = time.monotonic()
        if self._bar is None or (not force and now - self._last_poll < self.POLL_SECONDS):
            return
        self._last_poll = now
        done = self.rounds_done()
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def rounds_done(self) -> int:
        """Return the number of distinct ``server_round`` values in ``rounds.csv``."""
        try:
            with open(self.rounds_file, newline="", encoding="utf-8") as handle:
                return len({row["server_round"] for row in csv.DictReader(handle)})
        except (FileNotFoundError, KeyError):
            return 0


class TimeLeft:
    """Estimate the time left of a comparison from the runs measured so far.

    Estimate: mean seconds of the runs executed in this invocation times the runs still
    to do. Skipped and failed runs count as done and do not enter the mean.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.seconds: list[float] = []

    def skip(self) -> None:
        """Count a run that needed no time (finished earlier, or failed)."""
        self.done += 1

    def finished(self, seconds: float) -> None:
        """Count a run executed now that took ``seconds``."""
        self.done += 1
        self.seconds.append(seconds)

    def describe(self) -> str:
        """Return e.g. ``about 3 min 20 s left for 4 runs (estimate: mean 50 s per run so far)``."""
        remaining = self.total - self.done
        if remaining == 0:
            return "all runs done"
        if not self.seconds:
            return f"{remaining} runs left"
        mean = sum(self.seconds) / len(self.seconds)
        return (
            f"about {_format_duration(mean * remaining)} left for {remaining} runs "
            f"(estimate: mean {mean:.0f} s per run so far)"
        )


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


# ----- report -------------------------------------------------------------------------------


def write_report(outputs: Path) -> list[Path]:
    """Rebuild every table and figure of ``outputs/comparison`` from the saved run folders.

    Returns the files written. Raises ValueError when no run under ``outputs`` has finished.
    """
    from simulations.plots import write_plots

    outputs = Path(outputs)
    runs = report_runs(outputs)
    rounds = load_rounds(runs)
    if rounds.empty:
        raise ValueError(
            f"no finished run under {outputs}; expected run folders such as "
            f"{outputs / METHOD_FOLDERS['rs'] / 'iid-seed0'} (run `dpfedseg compare --out "
            f"{outputs}` first)"
        )
    folder = outputs / COMPARISON_DIR
    final = final_per_run(rounds)
    table = summarize(final)
    atomic.write_csv(folder / SUMMARY_CSV, table)
    figures = write_plots(rounds, folder)
    stops = early_stops(runs)
    stopped = ["## Runs stopped early\n", *stops, ""] if stops else []
    text = "\n".join(
        [
            "# RS vs AC comparison: summary\n",
            summary_markdown(table),
            *stopped,
            "## Claims\n",
            claims_markdown(claims(final)),
            "## Figures\n",
            *[f"- [{p.name}]({p.name})" for p in figures],
            "",
        ]
    )
    atomic.write_text(folder / SUMMARY_MD, text)
    runs = rounds.groupby(list(RUN_KEYS), dropna=False).ngroups
    log.info("report written to %s (%d runs)", folder, runs)
    return [*figures, folder / SUMMARY_CSV, folder / SUMMARY_MD]
