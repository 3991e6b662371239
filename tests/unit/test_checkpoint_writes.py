"""Staged checkpoint writes: copies taken at the save step, written later, byte for byte what a
direct write gives, into host buffers that the next save reuses."""

from collections import defaultdict

import safetensors.torch
import torch

from bigtrain.checkpoint.writes import Direct, Staged


def test_staged_files_hold_the_values_of_the_save_step(tmp_path):
    weight = torch.arange(6.0).reshape(2, 3)
    state = {"step": 3, "moments": [torch.ones(4)], "by_name": defaultdict(list, w=[weight])}
    writes = Staged()
    writes.begin()
    writes.safetensors({"w": weight}, tmp_path / "m.safetensors", {"tied": "w"})
    writes.torch_save(state, tmp_path / "o.pt")
    weight.add_(100)  # training goes on before the files are written
    state["moments"][0].zero_()
    state["moments"].append(torch.zeros(1))
    assert not any(tmp_path.iterdir())
    writes.flush()
    assert writes.written == [tmp_path / "m.safetensors", tmp_path / "o.pt"]
    assert torch.equal(safetensors.torch.load_file(tmp_path / "m.safetensors")["w"], torch.arange(6.0).reshape(2, 3))
    saved = torch.load(tmp_path / "o.pt", weights_only=False)
    assert saved["step"] == 3 and len(saved["moments"]) == 1 and torch.equal(saved["moments"][0], torch.ones(4))
    assert isinstance(saved["by_name"], defaultdict)
    assert torch.equal(saved["by_name"]["w"][0], torch.arange(6.0).reshape(2, 3))


def test_staged_and_direct_writes_are_the_same_bytes(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16)}
    direct, staged = Direct(), Staged()
    staged.begin()
    for writes, name in ((direct, "direct"), (staged, "staged")):
        writes.safetensors(tensors, tmp_path / f"{name}.safetensors", {"c": "a"})
    staged.flush()
    assert (tmp_path / "direct.safetensors").read_bytes() == (tmp_path / "staged.safetensors").read_bytes()


def test_the_next_save_reuses_the_buffers(tmp_path):
    writes = Staged()
    for step in range(3):
        writes.begin()
        writes.torch_save({"w": torch.full((4, 4), float(step)), "b": torch.zeros(2)}, tmp_path / f"{step}.pt")
        writes.flush()
        if step == 0:
            first = [b.data_ptr() for b in writes.buffers]
    assert [b.data_ptr() for b in writes.buffers] == first
    assert writes.bytes() == (16 + 2) * 4
    assert torch.equal(torch.load(tmp_path / "2.pt")["w"], torch.full((4, 4), 2.0))
    writes.begin()
    writes.torch_save({"w": torch.zeros(5)}, tmp_path / "other.pt")  # another shape: a new buffer
    assert writes.buffers[0].shape == (5,)
