"""`train.device` is honoured by every engine, also on a host with a GPU."""

import torch

from bigtrain.engine.device import rank_device


def test_cpu_stays_the_cpu_on_a_host_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert rank_device("cpu") == torch.device("cpu")


def test_a_gpu_is_the_one_this_rank_was_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert rank_device("auto") == rank_device("cuda") == torch.device("cuda", 3)
