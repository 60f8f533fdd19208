"""CUDA-only paths, checked on the CPU by standing in for torch.cuda's functions.

    --device cuda:N     runs.use_device makes GPU N the current device (torch.cuda.set_device)
    RNG state           a checkpoint holds the run's own GPU's CUDA generator, and restores it
                        onto the run's GPU however many GPUs are visible at resume
    backend             runs.dist_backend / dist_init: NCCL on GPUs, gloo on the CPU, and
                        $SAE_FT_DIST_BACKEND=gloo shares one GPU between several processes
    timers              bench_sae.py waits for the GPU before it starts or reads a timer
"""
import pytest
import torch
import torch.distributed as dist

import runs


class FakeGPUs:
    """torch.cuda's RNG and device functions on `count` pretend GPUs whose generator states are
    distinct tensors; records what was restored where."""

    def __init__(self, monkeypatch, count, current):
        self.count, self.current, self.restored = count, current, []
        self.states = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(count)]
        for name, fn in {"is_initialized": lambda: True, "is_available": lambda: True,
                         "device_count": lambda: self.count,
                         "current_device": lambda: self.current,
                         "get_rng_state": self.get, "set_rng_state": self.set,
                         "get_rng_state_all": self.refuse, "set_rng_state_all": self.refuse,
                         "set_device": self.set_device}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def get(self, device="cuda"):
        assert device == "cuda"                    # the current device's
        return self.states[self.current].clone()

    def set(self, state, device="cuda"):
        assert device == "cuda"
        self.restored.append((self.current, state.clone()))

    def set_device(self, device):
        self.current = torch.device(device).index

    @staticmethod
    def refuse(*args):
        raise AssertionError("every visible GPU's generator must not be touched")


def test_cuda_n_becomes_the_current_device(monkeypatch):
    """--device cuda:1 makes GPU 1 current (peak memory and pinned copies then go there);
    cuda and cpu leave the current device alone."""
    gpus = FakeGPUs(monkeypatch, count=4, current=0)
    assert runs.use_device("cuda:2", amp=True) == torch.device("cuda:2") and gpus.current == 2
    runs.use_device("cuda", amp=True)
    runs.use_device("cpu", amp=False)
    assert gpus.current == 2


def test_the_checkpoint_holds_the_runs_own_gpu_state(monkeypatch, tmp_path):
    """A run on cuda:2 of 4 visible GPUs saves GPU 2's state alone; resumed where one GPU is
    visible, that state goes onto that GPU (it was an IndexError, reported as "cannot read
    checkpoint")."""
    gpus = FakeGPUs(monkeypatch, count=4, current=2)
    runs.save_checkpoint(tmp_path / "checkpoint.pt", step=1, args={})
    state = runs.load_checkpoint(tmp_path / "checkpoint.pt")
    assert len(state["rng"]["cuda"]) == 1 and torch.equal(state["rng"]["cuda"][0],
                                                          gpus.states[2])
    gpus.count, gpus.current = 1, 0                 # resumed with one GPU visible
    runs.set_rng_state(state["rng"])
    assert len(gpus.restored) == 1 and gpus.restored[0][0] == 0
    assert torch.equal(gpus.restored[0][1], gpus.states[2])


def test_an_older_checkpoint_with_every_gpus_state_still_resumes(monkeypatch):
    """Checkpoints written before held one state per visible GPU: the current device's is
    restored, or the first when fewer were saved than the current index."""
    gpus = FakeGPUs(monkeypatch, count=4, current=1)
    saved = runs.rng_state()
    saved["cuda"] = [s.clone() for s in gpus.states]          # the former format, 4 GPUs
    runs.set_rng_state(saved)
    gpus.current = 0
    saved["cuda"] = saved["cuda"][3:]                         # ... or 1 state, now on GPU 0
    runs.set_rng_state(saved)
    assert [(d, int(s[0])) for d, s in gpus.restored] == [(1, 11), (0, 13)]


def test_a_run_that_never_touched_cuda_saves_no_cuda_state(monkeypatch):
    """No CUDA context is opened for the RNG state of a CPU run on a GPU machine."""
    FakeGPUs(monkeypatch, count=2, current=0)                 # visible, but never used
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", FakeGPUs.refuse)
    assert runs.rng_state()["cuda"] == []


def test_the_backend_is_nccl_on_gpus_gloo_on_the_cpu_unless_overridden(monkeypatch):
    monkeypatch.delenv(runs.BACKEND_ENV, raising=False)
    assert (runs.dist_backend("cuda:0"), runs.dist_backend("cpu")) == ("nccl", "gloo")
    monkeypatch.setenv(runs.BACKEND_ENV, "gloo")
    assert runs.dist_backend("cuda") == "gloo"
    for bad, device in (("mpi", "cuda"), ("nccl", "cpu")):
        monkeypatch.setenv(runs.BACKEND_ENV, bad)
        with pytest.raises(runs.UserError, match=runs.BACKEND_ENV):
            runs.dist_backend(device)


def joined_as(monkeypatch, local_rank, world):
    """dist_init's environment under torchrun, with the process group already joined (so
    dist_init only picks the device)."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)


def test_gloo_shares_one_gpu_between_processes_nccl_refuses(monkeypatch):
    """Two processes, one GPU: with SAE_FT_DIST_BACKEND=gloo both run on cuda:0 (the GPU check's
    two-rank run); with NCCL the second is refused with a one-line error naming the fix."""
    gpus = FakeGPUs(monkeypatch, count=1, current=0)
    joined_as(monkeypatch, local_rank=1, world=2)
    monkeypatch.delenv(runs.BACKEND_ENV, raising=False)
    with pytest.raises(runs.UserError, match="SAE_FT_DIST_BACKEND=gloo"):
        runs.dist_init("cuda")
    monkeypatch.setenv(runs.BACKEND_ENV, "gloo")
    gpus.current = None
    assert runs.dist_init("cuda") == "cuda:0" and gpus.current == 0


def test_nccl_gives_each_process_its_own_gpu(monkeypatch):
    gpus = FakeGPUs(monkeypatch, count=4, current=0)
    joined_as(monkeypatch, local_rank=3, world=4)
    monkeypatch.delenv(runs.BACKEND_ENV, raising=False)
    assert runs.dist_init("cuda") == "cuda:3" and gpus.current == 3


def test_bench_sae_waits_for_the_gpu_before_it_reads_the_clock(monkeypatch):
    """bench_sae.clock synchronises the timed device before reading the time (CUDA runs
    asynchronously), and the trainer's wall time is read through it at both ends."""
    from types import SimpleNamespace
    import bench_sae
    events, real = [], bench_sae.clock
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: events.append(("sync", str(device))))
    monkeypatch.setattr(bench_sae, "time", SimpleNamespace(
        perf_counter=lambda: events.append("time") or 0.0))
    real(torch.device("cuda:1"))
    real(torch.device("cpu"))
    assert events == [("sync", "cuda:1"), "time", "time"]
    monkeypatch.undo()
    timed = []
    monkeypatch.setattr(bench_sae, "clock", lambda device: timed.append(device) or real(device))
    args = bench_sae.parse_args(["--d", "8", "--atoms", "8", "--active", "2", "--n-train", "64",
                                 "--n-val", "16", "--batch-size", "32", "--epochs", "1", "--k", "2",
                                 "--quiet"])
    args.seed = 0
    h, A = bench_sae.planted_dictionary(8, 8, 2, 80, seed=0)
    bench_sae.train_ours(h[:64], h[64:], A, 2, args)
    assert timed == [h.device, h.device]
