"""Optuna storage for calibration: the record of every evaluation, resume, and distributed workers.

Layout in one Optuna RDB storage (SQLite by default, PostgreSQL for many machines):

- ``<run>/L{layer:03d}``: one Optuna study per layer, the only studies of a run, so
  ``optuna-dashboard <storage>`` shows the search and nothing else. Every evaluated point is a trial:
  its params are the knobs that point searched: at stage 1 the grid's ``simthreshd1`` and each head's
  budget (``h03.cdfthreshd`` or ``h03.topk``), at stage 2 each head's ``h03.pvthreshd`` (the fixed
  stage-1 values in user attrs), at the chosen point every knob of every head; plus the executor
  (``variant``, ``estimator``) and the search position (``stage``, ``step``); its value is the objective (predicted attention ms,
  minimised, or mean sparsity, maximised); its constraints are per head (constraint ``i``: head i's
  worst L1 minus its bound), so a trial is feasible when every head is. Besides the evaluations a
  layer holds a ``dense`` trial (time objective: dense SDPA, error 0) and a ``chosen`` trial: the
  config's point for the layer (per-head values as measured where each head sat; heads are
  independent), which is the study's best trial. Study user attrs hold each finished simthreshd1's
  stage-1 outcome (``stage1:<theta>``, or ``stage1:<quant>/<estimator>:<theta>`` for the time
  objective's families, reused on resume), quantization probes and the layer's final ``result``.
- Bookkeeping is not an Optuna study: two plain tables in the same database, ``sparge_runs`` (the
  run's *fingerprint*: model shape, capture hash, bounds, search settings, objective; a worker whose
  fingerprint differs is refused) and ``sparge_claims`` (one row per worker working on a layer, kept
  alive by heartbeats). The lowest-numbered live claim of a layer owns it; a claim whose heartbeat
  stops (a killed worker) is failed after the grace period (at once when its process on this host is
  gone), and the layer is picked up again. Results are deterministic, so any assignment of layers to
  workers gives the same config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from .search import PV_MAX, Evaluation, HeadResult, LayerResult
from .trial_store import add_finished_trials

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats and fail_stale_trials are marked experimental; we rely on them deliberately
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20


class StorageMismatch(ValueError):
    """The storage holds a calibration of another model or setting."""


def default_storage_url(out_path: str | os.PathLike) -> str:
    """``sqlite:///<out folder>/<out stem>.optuna.db``."""
    out = Path(out_path).resolve()
    return f"sqlite:///{out.with_name(out.stem + '.optuna.db')}"


def open_storage(url: str, *, heartbeat: int = HEARTBEAT_SECONDS, grace: int = GRACE_SECONDS) -> optuna.storages.RDBStorage:
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}  # several local worker processes share the file
    else:
        engine_kwargs["pool_pre_ping"] = True
    return optuna.storages.RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace, engine_kwargs=engine_kwargs)


class CalibrationStore:
    """The studies of one calibration run in one storage. ``direction``: "maximize" (sparsity) or
    "minimize" (predicted time) for the layer studies."""

    def __init__(self, storage: optuna.storages.RDBStorage, run: str, direction: str = "maximize"):
        self.storage = storage
        self.run = run
        self.direction = direction
        self._tables_ready = False
        self._stored_keys: dict[int, set] = {}  # per layer: the evaluated points already stored

    # ---------------------------------------------------------------- studies
    def _study(self, suffix: str, direction: str = "maximize") -> optuna.Study:
        return optuna.create_study(storage=self.storage, study_name=f"{self.run}/{suffix}", direction=direction,
                                   load_if_exists=True)

    def layer_study(self, layer: int) -> optuna.Study:
        return self._study(f"L{layer:03d}", self.direction)

    def check_fingerprint(self, fingerprint: dict[str, Any], *, create: bool) -> None:
        """Store the fingerprint on first use; refuse a storage made for something else."""
        wanted = json.loads(json.dumps(fingerprint))
        stored = self._read_fingerprint()
        if stored is None and not create:
            raise StorageMismatch(f"the storage has no calibration run {self.run!r} to join; start it first "
                                  f"(without --join) or check --storage")
        if stored is None:
            try:
                with self._engine().begin() as conn:
                    conn.execute(sa.insert(_RUNS).values(run=self.run, fingerprint=json.dumps(wanted, sort_keys=True)))
                return
            except sa.exc.IntegrityError:  # another worker registered the run first: compare with theirs
                stored = self._read_fingerprint()
        if stored != wanted:
            diff = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
            raise StorageMismatch(
                "the storage holds a calibration with other settings (" + ", ".join(
                    f"{k}: {stored.get(k)!r} there vs {wanted.get(k)!r} now" for k in diff)
                + "); use another --storage (or --out), or the same settings to resume")

    # ---------------------------------------------------------------- results
    def result(self, layer: int) -> LayerResult | None:
        raw = self.layer_study(layer).user_attrs.get("result")
        if raw is None:
            return None
        return LayerResult([HeadResult(**h) for h in raw["heads"]], raw["evaluations"], raw["mode"],
                           variant=raw.get("variant"), estimator=raw.get("estimator"), predicted=raw.get("predicted"),
                           cost=raw.get("cost", {}))

    def save_result(self, layer: int, result: LayerResult) -> None:
        self.layer_study(layer).set_user_attr(
            "result", {"heads": [asdict(h) for h in result.heads], "evaluations": result.evaluations, "mode": result.mode,
                       "variant": result.variant, "estimator": result.estimator, "predicted": result.predicted,
                       "cost": result.cost})

    def stage1_done(self, layer: int, family: str | None = None) -> dict[float, tuple[list[float], ...]]:
        """Finished simthreshd1 values of a layer: ``{theta: (budget, l1, sparsity[, density])}``
        (``family``: a time-objective family key, ``"<quant>/<estimator>"``)."""
        attrs = self.layer_study(layer).user_attrs
        prefix = "stage1:" if family is None else f"stage1:{family}:"
        out = {}
        for k, v in attrs.items():
            if k.startswith(prefix) and ":" not in k[len(prefix):]:
                out[float(k[len(prefix):])] = tuple(v)
        return out

    def save_stage1(self, layer: int, theta: float, budget, l1, sparsity, density=None, family: str | None = None) -> None:
        prefix = "stage1:" if family is None else f"stage1:{family}:"
        value = [list(map(float, budget)), list(map(float, l1)), list(map(float, sparsity))]
        if density is not None:
            value.append(list(map(float, density)))
        self.layer_study(layer).set_user_attr(f"{prefix}{theta!r}", value)

    def probes_done(self, layer: int) -> dict[str, list[float]]:
        """Quantized families' keep-everything per-head L1 (``probe:<family>``)."""
        attrs = self.layer_study(layer).user_attrs
        return {k.split(":", 1)[1]: v for k, v in attrs.items() if k.startswith("probe:")}

    def save_probe(self, layer: int, family: str, l1: list[float]) -> None:
        self.layer_study(layer).set_user_attr(f"probe:{family}", [float(x) for x in l1])

    def record_evaluations(self, layer: int, evaluations: list[Evaluation], bound: float, mode: str = "cdf",
                           pv_bound: float | None = None) -> None:
        """Store evaluations as finished trials; ``bound`` is the stage-1 L1 bound and ``pv_bound``
        (default ``bound``) the bound of points with stage 2 on.

        A batch is one transaction (``trial_store.add_finished_trials``): a worker killed while recording
        leaves all of it or none. The resumed search may still evaluate a batch again (one whose
        simthreshd1 had not been marked finished when the worker died); evaluations are deterministic, so
        points already stored (same variant, estimator, stage, step and per-head hyperparameters) are
        skipped instead of duplicated. The stored points of a layer are read from the database once per
        process and then kept up to date here (one worker owns a layer)."""
        if not evaluations:
            return
        study = self.layer_study(layer)
        stored = self._stored_keys.get(layer)
        if stored is None:
            stored = {_evaluation_key(t.params, t.user_attrs)
                      for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        trials, keys = [], set()
        for ev in evaluations:
            trial = evaluation_trial(ev, bound if ev.pvthreshd is None else (pv_bound or bound), mode)
            key = _evaluation_key(trial.params, trial.user_attrs)
            if key in stored or key in keys:
                continue
            keys.add(key)
            trials.append(trial)
        add_finished_trials(study, trials)
        self._stored_keys[layer] = stored | keys

    # ---------------------------------------------------------------- bookkeeping tables
    def _engine(self) -> sa.engine.Engine:
        engine = self.storage.engine
        if not self._tables_ready:
            try:
                _BOOKKEEPING.create_all(engine, checkfirst=True)
            except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError):
                # another worker created them between our check and our CREATE: they exist now
                _BOOKKEEPING.create_all(engine, checkfirst=True)
            self._tables_ready = True
        return engine

    def _read_fingerprint(self) -> dict | None:
        with self._engine().connect() as conn:
            row = conn.execute(sa.select(_RUNS.c.fingerprint).where(_RUNS.c.run == self.run)).first()
        return None if row is None else json.loads(row[0])

    def _fail_dead_claims(self, conn) -> None:
        """Fail claims whose heartbeat is older than the grace period, and claims of workers on this
        machine whose process is gone (a killed run being resumed), without waiting for their heartbeat."""
        now = time.time()
        conn.execute(sa.update(_CLAIMS).where(_CLAIMS.c.run == self.run, _CLAIMS.c.state == "running",
                                              _CLAIMS.c.heartbeat < now - self.storage.grace_period)
                     .values(state="failed"))
        host = os.uname().nodename
        rows = conn.execute(sa.select(_CLAIMS.c.claim_id, _CLAIMS.c.worker).where(
            _CLAIMS.c.run == self.run, _CLAIMS.c.state == "running")).all()
        for claim_id, worker in rows:
            who = str(worker).split(":")
            if len(who) == 3 and who[0] == host and who[1].isdigit() and not _pid_alive(int(who[1])):
                conn.execute(sa.update(_CLAIMS).where(_CLAIMS.c.claim_id == claim_id).values(state="failed"))

    def try_claim(self, layer: int, worker: str) -> int | None:
        """Claim a layer; returns the claim's id, or None if a live worker owns it."""
        engine = self._engine()
        with engine.begin() as conn:
            self._fail_dead_claims(conn)
        with engine.begin() as conn:
            now = time.time()
            mine = conn.execute(sa.insert(_CLAIMS).values(run=self.run, layer=layer, worker=worker, state="running",
                                                          heartbeat=now, started=now)).inserted_primary_key[0]
        with engine.begin() as conn:
            owner = conn.execute(sa.select(sa.func.min(_CLAIMS.c.claim_id)).where(
                _CLAIMS.c.run == self.run, _CLAIMS.c.layer == layer, _CLAIMS.c.state == "running")).scalar()
            if owner != mine:
                conn.execute(sa.update(_CLAIMS).where(_CLAIMS.c.claim_id == mine).values(state="failed"))
                return None
        return int(mine)

    def release(self, claim_id: int, ok: bool) -> None:
        with self._engine().begin() as conn:
            conn.execute(sa.update(_CLAIMS).where(_CLAIMS.c.claim_id == claim_id)
                         .values(state="done" if ok else "failed", heartbeat=time.time()))

    def _beat(self, claim_id: int) -> None:
        with self._engine().begin() as conn:
            conn.execute(sa.update(_CLAIMS).where(_CLAIMS.c.claim_id == claim_id, _CLAIMS.c.state == "running")
                         .values(heartbeat=time.time()))

    @contextlib.contextmanager
    def heartbeat(self, claim_id: int) -> Iterator[None]:
        """Keep a claim alive while its layer is worked on."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self._beat(claim_id)
                except Exception as err:  # a transient database error must not kill the search
                    logger.warning("heartbeat failed: %s", err)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def live_claims(self) -> dict[int, str]:
        """``{layer: worker}`` of the claims alive now."""
        with self._engine().begin() as conn:
            self._fail_dead_claims(conn)
            rows = conn.execute(sa.select(_CLAIMS.c.layer, _CLAIMS.c.worker).where(
                _CLAIMS.c.run == self.run, _CLAIMS.c.state == "running")).all()
        return {int(layer): str(worker) for layer, worker in rows}

    def delete_bookkeeping(self) -> None:
        """Remove this run's fingerprint and claims (its layer studies are deleted with Optuna's tools)."""
        with self._engine().begin() as conn:
            conn.execute(sa.delete(_CLAIMS).where(_CLAIMS.c.run == self.run))
            conn.execute(sa.delete(_RUNS).where(_RUNS.c.run == self.run))

    def claims(self) -> list[dict[str, Any]]:
        """Every claim of the run (tests and post-mortems): id, layer, worker, state."""
        with self._engine().connect() as conn:
            rows = conn.execute(sa.select(_CLAIMS.c.claim_id, _CLAIMS.c.layer, _CLAIMS.c.worker, _CLAIMS.c.state)
                                .where(_CLAIMS.c.run == self.run).order_by(_CLAIMS.c.claim_id)).all()
        return [{"id": int(r[0]), "layer": int(r[1]), "worker": str(r[2]), "state": str(r[3])} for r in rows]


_BOOKKEEPING = sa.MetaData()
_RUNS = sa.Table("sparge_runs", _BOOKKEEPING, sa.Column("run", sa.String(512), primary_key=True),
                 sa.Column("fingerprint", sa.Text, nullable=False))
_CLAIMS = sa.Table("sparge_claims", _BOOKKEEPING,
                   sa.Column("claim_id", sa.Integer, primary_key=True, autoincrement=True),
                   sa.Column("run", sa.String(512), nullable=False, index=True),
                   sa.Column("layer", sa.Integer, nullable=False),
                   sa.Column("worker", sa.String(256), nullable=False),
                   sa.Column("state", sa.String(16), nullable=False),  # running | done | failed
                   sa.Column("heartbeat", sa.Float, nullable=False),  # time.time() of the last beat
                   sa.Column("started", sa.Float, nullable=True))


# --------------------------------------------------------------------------------------------
# one evaluated point as an Optuna trial
# --------------------------------------------------------------------------------------------
_VARIANTS = ("dense", "none", "none+pv", "int8", "int8+pv", "int8-fp8", "int8-fp8+pv")
_TRIAL_DISTRIBUTIONS = {
    "variant": CategoricalDistribution(list(_VARIANTS)),
    "estimator": CategoricalDistribution(["", "pooled", "keys"]),
    "stage": CategoricalDistribution(["stage1", "stage2", "probe", "dense", "chosen"]),
    "step": IntDistribution(0, 1000),
    "simthreshd1": FloatDistribution(-1.0, 1.0),
    "cdfthreshd": FloatDistribution(0.0, 1.0),
    "topk": FloatDistribution(0.0, 1.0),
    "pvthreshd": FloatDistribution(0.0, PV_MAX),
}


def evaluation_trial(ev: Evaluation, bound: float, mode: str = "cdf") -> optuna.trial.FrozenTrial:
    """One evaluated point as a finished trial: per-head knobs as params, per-head constraints, the
    objective's value (``ev.value``; mean sparsity when the search set none)."""
    budget_name = "topk" if mode == "topk" else "cdfthreshd"
    dense = ev.stage == "dense"
    variant = "dense" if dense else ev.quant + ("+pv" if ev.pvthreshd is not None else "")
    params: dict[str, Any] = {"variant": variant, "estimator": "" if dense else ev.estimator, "stage": ev.stage,
                              "step": ev.step}
    dists = {k: _TRIAL_DISTRIBUTIONS[k] for k in params}

    def per_head(name: str, values, dist: str) -> None:
        for i, x in enumerate(values):
            params[f"h{i:02d}.{name}"] = float(x)
            dists[f"h{i:02d}.{name}"] = _TRIAL_DISTRIBUTIONS[dist]

    if ev.stage in ("stage1", "probe"):  # searched: the grid's simthreshd1 (one per point) and each head's budget
        if len(set(ev.simthreshd1)) == 1:
            params["simthreshd1"] = float(ev.simthreshd1[0])
            dists["simthreshd1"] = _TRIAL_DISTRIBUTIONS["simthreshd1"]
        else:
            per_head("simthreshd1", ev.simthreshd1, "simthreshd1")
        per_head(budget_name, ev.budget, budget_name)
    elif ev.stage == "stage2":  # searched: each head's pvthreshd, at its fixed stage-1 point
        per_head("pvthreshd", ev.pvthreshd, "pvthreshd")
    elif ev.stage == "chosen":  # the config's point: every knob of every head
        per_head("simthreshd1", ev.simthreshd1, "simthreshd1")
        per_head(budget_name, ev.budget, budget_name)
        if ev.pvthreshd is not None:
            per_head("pvthreshd", ev.pvthreshd, "pvthreshd")
    # the whole point as lists too (what identifies it: resume de-duplication reads these)
    attrs: dict[str, Any] = {"simthreshd1": [float(x) for x in ev.simthreshd1], "budget": [float(x) for x in ev.budget],
                             "pvthreshd": None if ev.pvthreshd is None else [float(x) for x in ev.pvthreshd],
                             "l1": [float(x) for x in ev.l1], "sparsity": [float(x) for x in ev.sparsity],
                             "mean_sparsity": float(sum(ev.sparsity) / len(ev.sparsity)), "bound": float(bound)}
    if ev.density is not None:
        attrs["density"] = [float(x) for x in ev.density]
    if ev.pv_skip is not None and ev.pvthreshd is not None:
        attrs["pv_skip"] = [float(x) for x in ev.pv_skip]
    value = float(ev.value) if ev.value is not None else attrs["mean_sparsity"]
    # constraints as one list, entry i = head i's excess: the format optuna-dashboard reads (and Optuna
    # reads it as constraints "0".."H-1"); one stored attribute per trial instead of one per head
    return optuna.trial.create_trial(
        params=params, distributions=dists, value=value, user_attrs=attrs,
        system_attrs={"constraints": [float(x) - bound for x in ev.l1]})


def _evaluation_key(params: dict, attrs: dict) -> tuple:
    """What identifies an evaluated point of a layer (its outcome follows from it): the trial's
    variant, estimator, stage and step and the point's per-head hyperparameters."""
    pv = attrs.get("pvthreshd")
    return (params.get("variant"), params.get("estimator"), params.get("stage"), params.get("step"),
            tuple(map(float, attrs.get("simthreshd1") or ())), tuple(map(float, attrs.get("budget") or ())),
            None if pv is None else tuple(map(float, pv)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_poll_seconds() -> float:
    return 2.0


def worker_id() -> str:
    return f"{os.uname().nodename}:{os.getpid()}:{int(time.time())}"
