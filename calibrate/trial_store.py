"""Add finished Optuna trials to an RDB storage in one transaction.

Why: ``optuna.Study.add_trials`` writes a batch trial by trial, and each trial param by param, every
write a query and a flush of its own (on the development machine about 36 ms a trial of 9 heads,
~1 minute for the ~1,900 trials of a SmolLM2 calibration), and a process killed in the middle of a
batch leaves part of it. Here a batch is one transaction over the tables of Optuna's own ORM models: one
insert per trial row (its id is needed), then one multi-row insert per table for every param, value,
user and system attribute of the batch, committed once, so a batch is stored whole or not at all.

What it relies on: the RDB schema of Optuna (tables ``trials``, ``trial_params``, ``trial_values``,
``trial_user_attributes``, ``trial_system_attributes``) through ``optuna.storages._rdb.models``; the
trial ``number`` is the count of the study's earlier trials, as Optuna assigns it, taken under a
lock on the study row. ``add_finished_trials`` checks the storage's schema version against the one
the installed Optuna writes and otherwise falls back to ``Study.add_trials`` (slower, same record).
Only finished trials (complete, pruned or failed) without intermediate values are taken: what the
calibration records.
"""

from __future__ import annotations

import datetime
import json
import logging
import weakref

import optuna
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


_SCHEMA_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> bool, asked once


def _schema_matches(storage: optuna.storages.RDBStorage) -> bool:
    """Whether the database's schema is the one the installed Optuna writes (asked once per storage:
    reading the head version loads Optuna's migration scripts)."""
    known = _SCHEMA_CHECKED.get(storage)
    if known is None:
        try:
            known = storage.get_current_version() == storage.get_head_version()
        except Exception:  # noqa: BLE001 - any doubt about the schema takes Optuna's own path
            known = False
        if not known:
            logger.info("the Optuna storage's schema differs from this Optuna's; trials are added one by one")
        _SCHEMA_CHECKED[storage] = known
    return known


def _check(trials: list[FrozenTrial]) -> None:
    for t in trials:
        if t.state not in _FINISHED:
            raise ValueError(f"only finished trials can be added in bulk, got state {t.state.name}")
        if t.intermediate_values:
            raise ValueError("trials with intermediate values are not supported in bulk; use Study.add_trials")
        missing = set(t.params) - set(t.distributions)
        if missing:
            raise ValueError(f"params without a distribution: {sorted(missing)}")


def add_finished_trials(study: optuna.Study, trials: list[FrozenTrial]) -> None:
    """Store ``trials`` (finished ``FrozenTrial`` templates, e.g. from ``optuna.trial.create_trial``)
    in ``study`` in one transaction; their numbers follow the study's existing trials in order.
    A study whose storage is not an up-to-date RDB storage takes ``study.add_trials``."""
    if not trials:
        return
    _check(trials)
    storage = getattr(study._storage, "_backend", study._storage)  # the RDB storage behind Optuna's cache
    if not isinstance(storage, optuna.storages.RDBStorage) or not _schema_matches(storage):
        study.add_trials(trials)
        return
    from optuna.storages._rdb import models
    from sqlalchemy import func, insert, select

    study_id = study._study_id
    trial_table = models.TrialModel.__table__
    children: dict = {models.TrialParamModel.__table__: [], models.TrialValueModel.__table__: [],
                      models.TrialUserAttributeModel.__table__: [], models.TrialSystemAttributeModel.__table__: []}
    params, values, user_attrs, system_attrs = children
    with storage.engine.begin() as conn:
        # the lock Optuna takes to number a trial (a no-op on SQLite, whose write transaction serialises)
        conn.execute(select(models.StudyModel.study_id).where(models.StudyModel.study_id == study_id)
                     .with_for_update())
        number = conn.execute(select(func.count(models.TrialModel.trial_id))
                              .where(models.TrialModel.study_id == study_id)).scalar_one()
        for t in trials:
            trial_id = conn.execute(insert(trial_table).values(
                study_id=study_id, number=number, state=t.state, datetime_start=_naive_utc(t.datetime_start),
                datetime_complete=_naive_utc(t.datetime_complete))).inserted_primary_key[0]
            number += 1
            for name, value in t.params.items():
                dist = t.distributions[name]
                children[params].append(dict(trial_id=trial_id, param_name=name,
                                             param_value=dist.to_internal_repr(value),
                                             distribution_json=distribution_to_json(dist)))
            for objective, value in enumerate(t.values or ()):
                stored, kind = models.TrialValueModel.value_to_stored_repr(value)
                children[values].append(dict(trial_id=trial_id, objective=objective, value=stored, value_type=kind))
            for key, value in t.user_attrs.items():
                children[user_attrs].append(dict(trial_id=trial_id, key=key, value_json=json.dumps(value)))
            for key, value in t.system_attrs.items():
                children[system_attrs].append(dict(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        for table, rows in children.items():
            if rows:
                conn.execute(insert(table), rows)  # one multi-row insert per table
    logger.debug("stored %d trials in study %s", len(trials), study.study_name)


def _naive_utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """How Optuna's RDB storage keeps a trial's datetimes: naive UTC."""
    return None if value is None else value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
