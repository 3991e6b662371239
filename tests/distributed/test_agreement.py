"""Decisions every rank must share are made once and broadcast: on 2 ranks (ZeRO-2), rank 1 is
shown a different resume point, remote latest, signal or loss than rank 0, and both ranks still
act alike and follow the uninterrupted loss curve (agreement_worker.py)."""

import json
import math
import os

import pytest
import yaml

from tests.helpers import ranks_config, torchrun


@pytest.fixture(scope="module")
def ranks(stdlib_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement")
    (out / "config.yaml").write_text(yaml.safe_dump(ranks_config(stdlib_data, out / "unused")))
    torchrun(2, os.path.join(os.path.dirname(__file__), "agreement_worker.py"), str(out / "config.yaml"), str(out))
    return [json.loads((out / f"results-{rank}.json").read_text()) for rank in (0, 1)]


def test_every_rank_resumes_from_rank_0s_checkpoint(ranks):
    straight = ranks[0]["straight"]["losses"]
    assert len(straight) == 6
    for rank in ranks:
        assert rank["resumed"] == {"losses": straight[4:], "step": 6, "preempted": False}


def test_every_rank_fetches_the_remote_latest_rank_0_read(ranks):
    straight = ranks[0]["straight"]["losses"]
    for rank in ranks:
        assert rank["fetched"] == {"losses": straight[4:], "step": 6, "preempted": False}


def test_a_signal_to_one_rank_ends_every_rank_at_the_same_step(ranks):
    straight = ranks[0]["straight"]["losses"]
    for rank in ranks:
        assert rank["ending"] == {"losses": straight[:4], "step": 4, "preempted": True}


def test_a_bad_step_on_one_rank_is_skipped_by_every_rank(ranks):
    for rank in ranks:
        assert rank["skip"]["skipped"] == 1
        assert math.isnan(rank["skip"]["losses"][1])  # step 2: rank 1's NaN is in the mean
        assert rank["skip"]["losses"][2:] == ranks[0]["skip"]["losses"][2:]
