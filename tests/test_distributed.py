"""unet.distributed.process_group: barrier before leaving on success, no barrier after a failure."""
import pytest
import torch

import unet.distributed as D


@pytest.fixture
def calls(monkeypatch):
    """Pretend a 2-rank group is up and record what process_group does with it."""
    log = []
    state = {"up": False}
    monkeypatch.setattr(D, "init_distributed", lambda *a, **k: (log.append("init"), state.update(up=True)))
    monkeypatch.setattr(D.torch_dist, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(D.torch_dist, "barrier", lambda *a, **k: log.append("barrier"))
    monkeypatch.setattr(D.torch_dist, "destroy_process_group", lambda *a, **k: (log.append("destroy"), state.update(up=False)))
    return log


INFO = D.DistInfo(rank=1, local_rank=1, world_size=2)


def test_success_meets_at_barrier_then_leaves(calls):
    with D.process_group(INFO, "gloo", torch.device("cpu")):
        calls.append("body")
    assert calls == ["init", "body", "barrier", "destroy"]


def test_return_inside_body_still_leaves(calls):
    def run():
        with D.process_group(INFO, "gloo", torch.device("cpu")):
            return 7
    assert run() == 7 and calls == ["init", "barrier", "destroy"]


def test_failure_leaves_without_barrier_and_reraises(calls):
    with pytest.raises(RuntimeError, match="boom"):
        with D.process_group(INFO, "gloo", torch.device("cpu")):
            raise RuntimeError("boom")
    assert calls == ["init", "destroy"]
