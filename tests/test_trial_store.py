"""calibrate.trial_store: trials added in one transaction read back as Optuna's own add_trials stores them."""

import datetime
import math
import os

import pytest

optuna = pytest.importorskip("optuna")

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution  # noqa: E402
from optuna.trial import TrialState, create_trial  # noqa: E402

from calibrate.trial_store import add_finished_trials  # noqa: E402


def _trials(seed: int):
    import random

    rng = random.Random(seed)
    start = datetime.datetime(2026, 12, 3, 12, 0, rng.randrange(60))
    out = []
    for i in range(6):
        value = [rng.uniform(0.1, 5.0), math.inf, -math.inf][i % 3]
        state = TrialState.FAIL if i == 5 else TrialState.COMPLETE
        out.append(create_trial(
            state=state,
            value=None if state == TrialState.FAIL else value,
            params={"variant": rng.choice(["dense", "int8+pv"]), "h00.cdfthreshd": rng.random(), "step": i},
            distributions={"variant": CategoricalDistribution(["dense", "int8+pv"]),
                           "h00.cdfthreshd": FloatDistribution(0.0, 1.0), "step": IntDistribution(0, 64)},
            user_attrs={"l1": [rng.random(), rng.random()], "note": "x" * rng.randrange(1, 9), "none": None},
            system_attrs={"constraints": [rng.uniform(-1, 1)]},
        ))
        out[-1].datetime_start = start + datetime.timedelta(seconds=i)
        out[-1].datetime_complete = start + datetime.timedelta(seconds=i + 1)
    return out


def _fields(t):
    return (t.number, t.state, t.values, t.params, t.distributions, t.user_attrs, t.system_attrs,
            t.intermediate_values, t.datetime_start, t.datetime_complete)


def _storage_url(kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    url = os.environ.get("SPARGE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("SPARGE_TEST_POSTGRES_URL is not set (.ci/run starts a PostgreSQL server and sets it)")
    return url


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_bulk_added_trials_read_back_as_optunas_own(tmp_path, kind):
    url = _storage_url(kind, tmp_path)
    storage = optuna.storages.RDBStorage(url)
    tag = tmp_path.name  # a server database outlives the test: study names of this run only
    ours = optuna.create_study(storage=storage, study_name=f"ours-{tag}", direction="minimize")
    theirs = optuna.create_study(storage=storage, study_name=f"theirs-{tag}", direction="minimize")
    for seed in (1, 2):  # two batches: the numbers go on from the stored trials
        add_finished_trials(ours, _trials(seed))
        theirs.add_trials(_trials(seed))
    got = optuna.load_study(study_name=f"ours-{tag}", storage=url).trials
    want = theirs.trials
    assert len(got) == len(want) == 12
    assert [_fields(t) for t in got] == [_fields(t) for t in want]
    assert ours.best_trial.number == theirs.best_trial.number


def test_unfinished_or_stepped_trials_are_refused(tmp_path):
    study = optuna.create_study(storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/s.db"))
    running = create_trial(state=TrialState.COMPLETE, value=1.0)
    running.state = TrialState.RUNNING
    with pytest.raises(ValueError, match="finished"):
        add_finished_trials(study, [running])
    stepped = create_trial(value=1.0, intermediate_values={0: 0.5})
    with pytest.raises(ValueError, match="intermediate"):
        add_finished_trials(study, [stepped])
    assert study.trials == []


def test_an_in_memory_study_takes_optunas_path():
    study = optuna.create_study()
    add_finished_trials(study, _trials(3))
    assert [t.number for t in study.trials] == list(range(6))
