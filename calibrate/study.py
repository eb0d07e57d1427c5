"""Optuna storage for calibration: the record of every evaluation, resume, and distributed workers.

Layout in one Optuna RDB storage (SQLite by default, PostgreSQL for many machines):

- ``<run>/meta``: study whose user attrs hold the run's *fingerprint* (model shape, capture hash,
  bounds, search settings). A worker whose fingerprint differs is refused: a storage belongs to one
  model and one setting.
- ``<run>/L{layer:03d}``: one study per layer. Every evaluated point is a trial (parameters, per-head
  L1 and sparsity in user attrs, mean sparsity as the value, the bound excess as a constraint), so
  ``optuna-dashboard <storage>`` shows the search. Study user attrs hold each finished
  simthreshd1's stage-1 outcome (``stage1:<theta>``, reused on resume) and the layer's final
  ``result``.
- ``<run>/claims``: one RUNNING trial per worker working on a layer, kept alive by heartbeats. The
  lowest-numbered live claim of a layer owns it; a claim whose heartbeat stops (a killed worker) is
  failed by ``optuna.storages.fail_stale_trials`` after the grace period, and the layer is picked up
  again. Results are deterministic, so any assignment of layers to workers gives the same config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from .search import Evaluation, HeadResult, LayerResult

logger = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)
# heartbeats and fail_stale_trials are marked experimental; we rely on them deliberately
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_SECONDS = 5
GRACE_SECONDS = 20
_DISTRIBUTIONS = {
    "simthreshd1": FloatDistribution(-1.0, 1.0),
    "stage": CategoricalDistribution(["stage1", "stage2"]),
    "step": IntDistribution(0, 1000),
}


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
    """The studies of one calibration run in one storage."""

    def __init__(self, storage: optuna.storages.RDBStorage, run: str):
        self.storage = storage
        self.run = run

    # ---------------------------------------------------------------- studies
    def _study(self, suffix: str, direction: str = "maximize") -> optuna.Study:
        return optuna.create_study(storage=self.storage, study_name=f"{self.run}/{suffix}", direction=direction,
                                   load_if_exists=True)

    def layer_study(self, layer: int) -> optuna.Study:
        return self._study(f"L{layer:03d}")

    def check_fingerprint(self, fingerprint: dict[str, Any], *, create: bool) -> None:
        """Store the fingerprint on first use; refuse a storage made for something else."""
        names = {s.study_name for s in optuna.get_all_study_summaries(self.storage)}
        exists = f"{self.run}/meta" in names
        if not exists and not create:
            raise StorageMismatch(f"the storage has no calibration run {self.run!r} to join; start it first "
                                  f"(without --join) or check --storage")
        meta = self._study("meta")
        stored = meta.user_attrs.get("fingerprint")
        wanted = json.loads(json.dumps(fingerprint))
        if stored is None:
            meta.set_user_attr("fingerprint", wanted)
            return
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
        return LayerResult([HeadResult(**h) for h in raw["heads"]], raw["evaluations"], raw["mode"])

    def save_result(self, layer: int, result: LayerResult) -> None:
        self.layer_study(layer).set_user_attr(
            "result", {"heads": [asdict(h) for h in result.heads], "evaluations": result.evaluations, "mode": result.mode})

    def stage1_done(self, layer: int) -> dict[float, tuple[list[float], list[float], list[float]]]:
        attrs = self.layer_study(layer).user_attrs
        return {float(k.split(":", 1)[1]): tuple(v) for k, v in attrs.items() if k.startswith("stage1:")}

    def save_stage1(self, layer: int, theta: float, budget, l1, sparsity) -> None:
        self.layer_study(layer).set_user_attr(f"stage1:{theta!r}", [list(map(float, budget)), list(map(float, l1)),
                                                                     list(map(float, sparsity))])

    def record_evaluations(self, layer: int, evaluations: list[Evaluation], bound: float) -> None:
        """Store evaluations as finished trials; ``bound`` is the L1 bound of their stage (the
        constraint is the worst head's excess over it).

        Optuna adds a batch trial by trial, so a worker killed mid-batch leaves part of it; the resumed
        search evaluates that batch again (its simthreshd1 was not finished). Evaluations are
        deterministic, so points already stored (same stage, step and per-head hyperparameters) are
        skipped: a resumed batch completes the partial one instead of duplicating it."""
        if not evaluations:
            return
        study = self.layer_study(layer)
        stored = {_evaluation_key(t.params.get("stage"), t.params.get("step"), t.user_attrs)
                  for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}
        trials = []
        for ev in evaluations:
            key = _evaluation_key(ev.stage, ev.step, {"simthreshd1": list(ev.simthreshd1), "budget": list(ev.budget),
                                                      "pvthreshd": None if ev.pvthreshd is None else list(ev.pvthreshd)})
            if key in stored:
                continue
            stored.add(key)
            excess = max(ev.l1) - bound
            trials.append(optuna.trial.create_trial(
                params={"simthreshd1": float(ev.simthreshd1[0]), "stage": ev.stage, "step": ev.step},
                distributions=_DISTRIBUTIONS,
                value=float(sum(ev.sparsity) / len(ev.sparsity)),
                user_attrs={"simthreshd1": list(ev.simthreshd1), "budget": list(ev.budget),
                            "pvthreshd": None if ev.pvthreshd is None else list(ev.pvthreshd),
                            "l1": list(ev.l1), "sparsity": list(ev.sparsity)},
                constraints={"l1_excess": float(excess)},
            ))
        study.add_trials(trials)

    # ---------------------------------------------------------------- claims
    def _claims(self) -> optuna.Study:
        return self._study("claims")

    def _reap_dead_local_workers(self, claims: optuna.Study) -> None:
        """Fail claims of workers on this machine whose process is gone (a killed run being resumed),
        without waiting for their heartbeat to go stale."""
        host = os.uname().nodename
        for t in claims.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            who = str(t.user_attrs.get("worker", "")).split(":")
            if len(who) == 3 and who[0] == host and who[1].isdigit() and not _pid_alive(int(who[1])):
                self.storage.set_trial_state_values(t._trial_id, TrialState.FAIL)

    def try_claim(self, layer: int, worker: str) -> int | None:
        """Claim a layer; returns the claim's trial id, or None if a live worker owns it."""
        claims = self._claims()
        optuna.storages.fail_stale_trials(claims)
        self._reap_dead_local_workers(claims)
        template = optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs={"layer": layer, "worker": worker})
        trial_id = self.storage.create_new_trial(claims._study_id, template_trial=template)
        self.storage.record_heartbeat(trial_id)
        mine = self.storage.get_trial_number_from_id(trial_id)
        running = claims.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        owner = min(t.number for t in running if t.user_attrs.get("layer") == layer)
        if owner != mine:
            self.storage.set_trial_state_values(trial_id, TrialState.FAIL)
            return None
        return trial_id

    def release(self, trial_id: int, ok: bool) -> None:
        state = TrialState.COMPLETE if ok else TrialState.FAIL
        self.storage.set_trial_state_values(trial_id, state, values=[0.0] if ok else None)

    @contextlib.contextmanager
    def heartbeat(self, trial_id: int) -> Iterator[None]:
        """Keep a claim alive while its layer is worked on."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.storage.record_heartbeat(trial_id)
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
        claims = self._claims()
        optuna.storages.fail_stale_trials(claims)
        return {t.user_attrs["layer"]: t.user_attrs.get("worker", "?")
                for t in claims.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def _evaluation_key(stage, step, attrs: dict) -> tuple:
    """What identifies an evaluated point of a layer (its outcome follows from it)."""
    pv = attrs.get("pvthreshd")
    return (stage, step, tuple(map(float, attrs.get("simthreshd1") or ())), tuple(map(float, attrs.get("budget") or ())),
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
