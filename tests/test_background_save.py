"""Background checkpoints: the same bytes as the synchronous save, the state of the moment save() was called,
errors raised on the training thread, one write at a time, and a SIGKILL mid-write leaves the old file."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from unet.training import background_save
from unet.training.background_save import BackgroundCheckpointer
from unet.checkpoint import load_checkpoint, save_checkpoint
from unet.errors import UserError
from unet.model import UNet

REPO = Path(__file__).resolve().parents[1]


def trained_state(channels_last: bool = False):
    """A small model after one Adam step (so the optimizer holds exp_avg/exp_avg_sq/step tensors)."""
    torch.manual_seed(0)
    model = UNet(base_filters=4, depth=3, padding="same")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(2, 1, 16, 16)).sum().backward()
    opt.step()
    return model, opt


def extra_of(opt, step=3):
    return {"step": step, "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "args": {"lr": 1e-3, "fold": None, "sizes": [1, 2]}, "metrics": ({"dice": 0.5},)}


def assert_same_tree(a, b, where="ckpt"):
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("channels_last", [False, True])
def test_same_checkpoint_and_same_bytes_as_the_synchronous_save(tmp_path, channels_last):
    model, opt = trained_state(channels_last)
    extra = extra_of(opt)
    save_checkpoint(tmp_path / "sync.pt", model, **extra)
    with BackgroundCheckpointer() as saver:
        saver.save(tmp_path / "background.pt", model, **extra)
    sync = torch.load(tmp_path / "sync.pt", weights_only=True)
    background = torch.load(tmp_path / "background.pt", weights_only=True)
    assert_same_tree(sync, background)
    # torch.save writes no timestamps, so the serialisations must match byte for byte.
    assert (tmp_path / "sync.pt").read_bytes() == (tmp_path / "background.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["background.pt", "sync.pt"]  # no temporary left


def test_the_file_holds_the_state_of_the_moment_save_was_called(tmp_path, monkeypatch):
    model, opt = trained_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gate = threading.Event()
    real_save = background_save.save_checkpoint

    def held_save(*args, **kwargs):  # the writer waits until training has moved on
        assert gate.wait(10)
        real_save(*args, **kwargs)
    monkeypatch.setattr(background_save, "save_checkpoint", held_save)
    with BackgroundCheckpointer() as saver:
        saver.save(tmp_path / "last.pt", model, step=1, optimizer=opt.state_dict())
        model(torch.rand(2, 1, 16, 16)).sum().backward()
        opt.step()  # changes the weights and the optimizer state in place while the write waits
        assert not torch.equal(model.state_dict()["out.head.weight"], before["out.head.weight"])
        gate.set()
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert_same_tree(ckpt["model"], before)
    assert int(ckpt["optimizer"]["state"][0]["step"]) == 1


def test_write_errors_are_raised_on_the_training_thread_once(tmp_path):
    model, _ = trained_state()
    saver = BackgroundCheckpointer()
    saver.save(tmp_path / "missing" / "last.pt", model)  # returns: the write fails on the thread
    with pytest.raises(UserError, match=r"cannot write .*last.pt: folder .*missing does not exist"):
        saver.flush()
    saver.flush()  # reported once, not again
    saver.save(tmp_path / "missing" / "last.pt", model)
    with pytest.raises(UserError, match="folder .*missing does not exist"):
        saver.save(tmp_path / "ok.pt", model)  # the next save raises the previous write's error ...
    saver.close()  # ... and did not start its own write
    assert not (tmp_path / "ok.pt").exists()
    with pytest.raises(RuntimeError, match=r"save\(\) after close\(\)"):
        saver.save(tmp_path / "ok.pt", model)


def test_leaving_the_block_on_an_error_still_writes_and_keeps_the_first_error(tmp_path):
    model, _ = trained_state()
    with pytest.raises(ValueError, match="loss is nan") as info:
        with BackgroundCheckpointer() as saver:
            saver.save(tmp_path / "last.pt", model, step=5)
            saver.save(tmp_path / "nowhere" / "best.pt", model, step=5)
            raise ValueError("loss is nan")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 5
    assert any("background checkpoint write failed" in n for n in getattr(info.value, "__notes__", []))


def test_one_write_in_flight_and_every_requested_file_written(tmp_path, monkeypatch):
    model, opt = trained_state()
    active, most = [0], [0]
    lock = threading.Lock()
    real_save = background_save.save_checkpoint

    def counting_save(*args, **kwargs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            real_save(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1
    monkeypatch.setattr(background_save, "save_checkpoint", counting_save)
    with BackgroundCheckpointer() as saver:
        for step, name in ((1, "last.pt"), (2, "best.pt"), (3, "last.pt")):
            saver.save(tmp_path / name, model, step=step, optimizer=opt.state_dict())
    assert most[0] == 1
    assert load_checkpoint(tmp_path / "best.pt")["step"] == 2 and load_checkpoint(tmp_path / "last.pt")["step"] == 3


KILLED_WRITER = textwrap.dedent("""
    import sys, time
    import torch
    from unet.training.background_save import BackgroundCheckpointer
    from unet.checkpoint import save_checkpoint
    from unet.model import UNet

    path = sys.argv[1]
    torch.manual_seed(0)
    model = UNet(base_filters=4, depth=3, padding="same")
    save_checkpoint(path, model, step=1)  # the good checkpoint the kill must leave in place

    class SlowFile:  # the real file, written slowly, so the kill lands in the middle of the serialisation
        def __init__(self, f):
            self.f, self.calls = f, 0
        def write(self, data):
            self.calls += 1
            if self.calls == 3:  # one write call: print() writes the text and the newline apart, and the
                sys.stdout.write("WRITING\\n")  # main thread's line could land between them
                sys.stdout.flush()
            if self.calls >= 3:
                time.sleep(0.2)
            return self.f.write(data)
        def __getattr__(self, name):
            return getattr(self.f, name)

    real_save = torch.save
    torch.save = lambda obj, f, **kw: real_save(obj, SlowFile(f), **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with BackgroundCheckpointer() as saver:
        saver.save(path, model, step=2, big=torch.randn(2_000_000))
        sys.stdout.write("SAVE RETURNED\\n")
        sys.stdout.flush()
    sys.stdout.write("DONE\\n")
    sys.stdout.flush()
""")


def test_sigkill_during_a_background_write_leaves_the_old_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if "WRITING" in line:  # a substring: the two threads' lines may still share one line of output
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(30)
    assert any("WRITING" in line for line in lines) and "DONE" not in lines, lines
    assert proc.returncode == -signal.SIGKILL
    ckpt = load_checkpoint(path)  # the old file, whole
    assert ckpt["step"] == 1 and "big" not in ckpt
    torch.manual_seed(0)
    assert_same_tree(ckpt["model"], {k: v for k, v in UNet(base_filters=4, depth=3, padding="same").state_dict().items()})
    # The killed write left at most its hidden temporary file, never anything under the final name.
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("last.pt", "writer.py"))
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.pt.") and leftovers[0].endswith(".tmp.pt")
