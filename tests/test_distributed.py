"""Several processes (torchrun, PyTorch DDP) on CPU with the gloo backend: 2 processes end where
1 process with the same effective batch ends.

Two launches of 2 processes (each costs ~10–15 s of imports on a busy machine):
    torchrun    `torchrun --nproc_per_node=2 finetune.py …`, through the command line;
    spawned     torch.multiprocessing, 2 processes running phases one after another: a run
                stopped after step 3 and resumed, train_sae.py's embedding extraction,
                evaluate.py, DDP's gradient all-reduce count, and the bad setups (a world size
                that leaves a rank without a micro-batch; a rank that dies). Each rank writes what
                it saw to files the tests below read.
The one-process references run in this process.
"""
import itertools
import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import evaluate
import finetune
import runs
import train_sae
from conftest import write_tiny_sae

HERE = Path(__file__).resolve().parents[1]  # the repository root
LR = 1e-3


def ft_args(clip, dataset, sae, batch_size):
    """64 images, micro-batch `batch_size`, 2 micro-batches per step, 2 epochs, random crops."""
    return ["--model", f"local-dir:{clip}", "--train-data", str(dataset), "--sae", str(sae),
            "--reg", "sae-preserve", "--batch-size", str(batch_size), "--accum-steps", "2",
            "--epochs", "2", "--lr", str(LR), "--warmup-steps", "1", "--workers", "0",
            "--log-every", "1", "--probe-every", "4", "--probe-size", "8", "--device", "cpu"]


def sae_args(clip, dataset, cache):
    return train_sae.parse_args(["--model", f"local-dir:{clip}", "--train-data", str(dataset),
                                 "--cache-dir", str(cache), "--extract-batch-size", "8",
                                 "--workers", "0", "--device", "cpu", "--out", "unused"])


def eval_args(run, sae, dataset, results):
    return ["--runs", str(run), "--sae", str(sae), "--sets", f"test={dataset}:test",
            "--id-set", "test", "--wise-alphas", "0.5", "--device", "cpu", "--workers", "0",
            "--batch-size", "8", "--results", str(results)]


def read_jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


# ============================================================================================
# The launches
# ============================================================================================

@pytest.fixture(scope="module")
def paths(tiny_clip_dir, tiny_image_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    write_tiny_sae(tmp / "sae", tiny_clip_dir)
    return {"tmp": tmp, "clip": tiny_clip_dir, "data": tiny_image_dataset, "sae": tmp / "sae"}


@pytest.fixture(scope="module")
def one_process(paths):
    """The reference: one process, micro-batch 8 × 2 accumulation steps = effective batch 16."""
    p, out = paths, paths["tmp"] / "one"
    finetune.main([*ft_args(p["clip"], p["data"], p["sae"], 8), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def torchrun(paths):
    """`torchrun --nproc_per_node=2 finetune.py`: micro-batch 4 × 2 steps × 2 processes = 16."""
    p, out = paths, paths["tmp"] / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "finetune.py"), *ft_args(p["clip"], p["data"], p["sae"], 4),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=p["tmp"], timeout=600,
                       env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(paths, one_process):
    """2 processes (torch.multiprocessing) through every phase of `phases`."""
    ports = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # any free port
    torch.multiprocessing.spawn(phases, args=(ports.port, paths, one_process), nprocs=2)
    return paths["tmp"] / "spawned"


def phases(rank, ports_port, p, one_run):
    """What each of the 2 spawned processes runs (as torchrun would start it)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", TQDM_DISABLE="1")
    torch.set_num_threads(1)
    runs.DIST_TIMEOUT = timedelta(seconds=120)   # a lost peer must end the test, not hang it
    a_port_per_join(dist.TCPStore("127.0.0.1", ports_port, is_master=False,
                                  timeout=runs.DIST_TIMEOUT), rank)
    out, seen = p["tmp"] / "spawned", {}
    out.mkdir(exist_ok=True)
    run = ft_args(p["clip"], p["data"], p["sae"], 4)

    # 1. stopped after step 3 (checkpoint at step 2 and 3), a log line written after the last
    # checkpoint (as a kill leaves it), then resumed.
    finetune.main([*run, "--max-steps", "3", "--save-every", "2", "--out", str(out / "part")])
    if rank == 0:
        with open(out / "part" / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": 4, "reg": -1.0}) + "\n")
    finetune.main([*run, "--resume", "--out", str(out / "part")])

    # 2. extraction: every rank embeds its half, all get the whole; rank 0 writes the cache
    runs.dist_init("cpu")
    h, labels = train_sae.zero_shot_embeddings(sae_args(p["clip"], p["data"], out / "cache"))
    torch.save({"h": h, "labels": labels}, out / f"h{rank}.pt")
    runs.dist_teardown()

    # 3. evaluate.py: every rank embeds its half of each set; rank 0 scores and writes
    evaluate.main(eval_args(one_run, p["sae"], p["data"], out / "results.jsonl"))

    # 4. DDP all-reduces once per optimiser step, not once per micro-batch (no_sync)
    seen["allreduce_calls"] = count_allreduces(p)

    # 5. a world size that leaves a rank without a micro-batch: 64 < 32 × 2 × 2
    seen["too_few"] = error_of(finetune.main, [*ft_args(p["clip"], p["data"], p["sae"], 32),
                                               "--out", str(out / "too_few")])
    # 6. a rank that dies: rank 1 leaves; rank 0 must stop with an error, not wait forever
    if rank == 0:
        seen["lost"] = error_of(finetune.main, [*run, "--out", str(out / "lost")])
    (out / f"seen{rank}.json").write_text(json.dumps(seen))


def a_port_per_join(ports, rank):
    """Each time `phases` joins a process group (six times), a MASTER_PORT of its own:
    rank 0 picks a free one just before it joins and hands it to rank 1 through the store
    `ports` (the parent's).

    One port for all six joins failed now and then (a spawn error in this fixture): rank 0
    hosts each join's TCPStore server on MASTER_PORT, and a rank that left a group a moment
    before rank 0 and joined the next one reached the previous group's server, still up on
    rank 0 (it lingers after destroy_process_group while anything holds the group, such as a
    DDP model). Then the join timed out ("1/2 clients joined"), or read the previous group's
    gloo addresses (TCPStore is multi-tenant: rank 0's next join reuses a live server, keys
    and all, and the key names repeat) and failed with "Connection refused". A torchrun
    process joins once, so the stages themselves never meet this."""
    join, joins = runs.dist_init, itertools.count()

    def dist_init(device):
        if not dist.is_initialized():              # (already joined: dist_init does nothing)
            key = f"join {next(joins)}"
            if rank == 0:
                ports.set(key, str(free_port()))
            os.environ["MASTER_PORT"] = ports.get(key).decode()
        return join(device)
    runs.dist_init = dist_init                     # the stages call runs.dist_init


def error_of(main, argv):
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return None


def count_allreduces(p):
    """Gradient all-reduces (bucket hooks) in each of 4 finetune_steps of 1, 1, 2 and 2
    micro-batches, counted by a communication hook."""
    import copy
    from types import SimpleNamespace
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP
    import models
    runs.dist_init("cpu")
    clf, _, _, _ = models.zero_shot_classifier(f"local-dir:{p['clip']}", None, ["a", "b"], ["{}"])
    f0 = copy.deepcopy(clf.visual).eval().requires_grad_(False)
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)
    model = DDP(clf)
    model.register_comm_hook(None, counting_allreduce)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1)
    x, y, idx = torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,)), torch.arange(4)
    counts = []
    for accum in (1, 1, 2, 2):
        args = SimpleNamespace(reg="l2", amp=False, accum_steps=accum, label_smoothing=0.0,
                               clip_grad=1.0, lam=1.0, mu=1.0, lam_mask=1.0, lam_l1=0.0,
                               lam_remove=0.0, sae_space="unit")
        before = len(calls)
        finetune.finetune_step(model, f0, None, opt, [(x[i::accum], y[i::accum], idx[i::accum])
                                                      for i in range(accum)], args)
        counts.append(len(calls) - before)
    runs.dist_teardown()
    return counts


# ============================================================================================
# The tests
# ============================================================================================

def test_two_processes_end_where_one_process_does(torchrun, one_process):
    """Same effective batch (4 × 2 × 2 processes = 8 × 2 × 1), same seed: each step sees the same
    16 images, rank r the r-th half of each micro-batch. CE and R are means over each rank's
    micro-batch and DDP averages the ranks' gradients, so with equal rank batches the gradient
    is the big batch's mean gradient, up to float32 summation order (~1e-7 relative). AdamW
    divides by √v, so such noise moves a weight by a tiny fraction of a step: weights must agree
    to 1 % of one step's size (lr), the logs to 1e-4 relative. The exception is the attention
    key bias: softmax(q·(k + b)) does not depend on it, its true gradient is 0 and its computed
    one float noise, which AdamW scales up to steps of ~lr in any direction — any two summation
    orders (one process or two) move it differently, so it is left out."""
    out, stdout = torchrun
    assert ("effective batch 16 = 4 × 2 × 2 processes | 4 steps/epoch, 8 total" in stdout), stdout
    assert [ln.split(" |")[0] for ln in stdout.splitlines() if ln.startswith("step ")] == \
        [f"step {i}" for i in range(1, 9)]                # rank 0 prints, once per step
    a, b = load_file(out / "model.safetensors"), load_file(one_process / "model.safetensors")
    assert a.keys() == b.keys()
    def without_key_bias(k, t):                         # in_proj_bias = (b_q, b_k, b_v)
        return t.view(3, -1)[[0, 2]] if k.endswith("attn.in_proj_bias") else t
    diff = max((without_key_bias(k, a[k]) - without_key_bias(k, b[k])).abs().max().item()
               for k in a)
    assert diff < 0.01 * LR, diff
    two, one = read_jsonl(out / "train_log.jsonl"), read_jsonl(one_process / "train_log.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, 9))
    for r2, r1 in zip(two, one):
        assert r2["acc"] == r1["acc"]                      # counted over both ranks' images
        for k in ("ce", "res", "pres", "reg", "grad_norm", "lr"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-9), (r2["step"], k)
    assert [p["step"] for p in read_jsonl(out / "probe.jsonl")] == [0, 4, 8]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["finished"] is True


def test_killed_two_process_run_resumes_bit_for_bit(spawned, torchrun, paths):
    full, part = torchrun[0], spawned / "part"
    a, b = load_file(full / "model.safetensors"), load_file(part / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_log, part_log = read_jsonl(full / "train_log.jsonl"), read_jsonl(part / "train_log.jsonl")
    assert [r["step"] for r in part_log] == list(range(1, 9))    # the stray step-4 line dropped
    assert [r["reg"] for r in part_log] == [r["reg"] for r in full_log]
    # One process cannot continue a 2-process run: its data order would differ.
    with pytest.raises(SystemExit) as e:
        finetune.main([*ft_args(paths["clip"], paths["data"], paths["sae"], 4), "--resume",
                       "--out", str(part)])
    assert e.value.code == (f"error: the run in {part} was trained by 2 process(es), not 1: "
                            "resume it with as many (the data order and the effective batch "
                            "depend on it)")


def test_two_process_extraction_equals_one_process(spawned, paths):
    """Each rank embeds its contiguous half of the images; the gathered result, on both ranks,
    is the one-process result in the same order (the same batches of 8 here: 32 per rank)."""
    ref, ref_labels = train_sae.zero_shot_embeddings(
        sae_args(paths["clip"], paths["data"], paths["tmp"] / "cache_one"))
    for rank in (0, 1):
        got = torch.load(spawned / f"h{rank}.pt")
        torch.testing.assert_close(got["h"], ref)
        assert torch.equal(got["labels"], ref_labels)
    assert len(list((spawned / "cache").glob("emb-*.safetensors"))) == 1   # rank 0 wrote it
    cached = load_file(next((spawned / "cache").glob("emb-*.safetensors")))
    torch.testing.assert_close(cached["h"], ref)


def test_two_process_evaluate_writes_the_one_process_lines(spawned, paths, one_process):
    one = paths["tmp"] / "results_one.jsonl"
    evaluate.main(eval_args(one_process, paths["sae"], paths["data"], one))
    two_lines, one_lines = read_jsonl(spawned / "results.jsonl"), read_jsonl(one)
    assert [r["model"] for r in two_lines] == [r["model"] for r in one_lines]   # rank 0 only
    for r2, r1 in zip(two_lines, one_lines):
        assert r2["n"] == r1["n"] == 32 and r2["top1"] == r1["top1"]
        for k in ("cka", "fvu", "overlap", "l0"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-5), (r1["model"], k)


def test_gradients_are_all_reduced_once_per_optimiser_step(spawned):
    """No gradient sync on the accumulation micro-steps (DDP's no_sync): a step of 2 micro-batches
    all-reduces exactly as often as a step of 1 (once per gradient bucket)."""
    for rank in (0, 1):
        counts = json.loads((spawned / f"seen{rank}.json").read_text())["allreduce_calls"]
        assert counts[1] >= 1 and counts[2] == counts[3] == counts[1], counts


def test_bad_setups_end_with_an_error_not_a_hang(spawned):
    seen = [json.loads((spawned / f"seen{rank}.json").read_text()) for rank in (0, 1)]
    for s in seen:
        assert s["too_few"] == ("error: 64 training images are fewer than one effective batch "
                                "(--batch-size 32 × --accum-steps 2 × 2 processes)")
    lost = seen[0]["lost"]
    assert isinstance(lost, str) and lost.startswith("error: process 0 of 2 lost contact with "
                                                     "the others"), lost
    assert "\n" not in lost
