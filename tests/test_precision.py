"""The precision policy (runs.set_precision, losses.exact_fp32), checked on the CPU.

Every stage and benchmark sets the same switches through runs.use_device as its setup ends:
TF32 for cuBLAS matmuls and cuDNN convolutions with --amp, IEEE fp32 with --no-amp. The
switches only act on CUDA, but they are plain process state, visible here. The SAE (encode,
Top-k, decode), the regulariser and the SAE's training step run in IEEE fp32 whatever the stage
set: under an outer bf16 autocast (which on the CPU really runs matmuls in bf16) they give the
same bits as without it.
"""
import copy

import pytest
import torch

import bench
import bench_sae
import evaluate
import finetune
import interpret
import losses
import runs
import train_sae
from conftest import write_tiny_sae
from sae import TopKSAE

MATMUL, CONV = torch.backends.cuda.matmul, torch.backends.cudnn.conv


def switches():
    return MATMUL.fp32_precision, CONV.fp32_precision


@pytest.fixture(autouse=True)
def restore_switches():
    before = switches()
    yield
    MATMUL.fp32_precision, CONV.fp32_precision = before


class SetupDone(Exception):
    """Raised by the spy once a stage has set its device and precision: the test stops there."""


@pytest.fixture
def setups(monkeypatch):
    """Every runs.use_device call: (device, amp, the switches right after); then SetupDone."""
    seen, real = [], runs.use_device

    def spy(device, amp):
        real(device, amp)
        seen.append((str(device), amp, switches()))
        raise SetupDone
    monkeypatch.setattr(runs, "use_device", spy)
    return seen


def stage_setups(tmp, clip, data, run, sae, amp):
    """{name: callable that runs the stage (or benchmark) until its setup is done}."""
    flag, model = ("--amp" if amp else "--no-amp"), f"local-dir:{clip}"
    probe = {"device": "cpu", "model": "tiny", "num_classes": 4, "seed": 0, "batch_size": 2,
             "steps": 1, "bf16": amp, "ckpt": False, "threads": 1, "expansion": 2, "k": 4}
    return {
        "train_sae": lambda: train_sae.main(["--model", model, "--train-data", data, "--device",
                                             "cpu", flag, "--workers", "0",
                                             "--out", str(tmp / "sae_out")]),
        "finetune": lambda: finetune.main(["--model", model, "--train-data", data, "--reg",
                                           "none", "--device", "cpu", flag, "--workers", "0",
                                           "--out", str(tmp / "ft")]),
        "evaluate": lambda: evaluate.main(["--runs", str(run), "--sets", f"test={data}:test",
                                           "--id-set", "test", "--device", "cpu", flag,
                                           "--results", str(tmp / "results.jsonl")]),
        "interpret": lambda: interpret.main(["report", "--run", str(run), "--sae", str(sae),
                                             "--data", data, "--device", "cpu", flag,
                                             "--out", str(tmp / "report")]),
        "bench": lambda: bench.main(["--device", "cpu", "--model", "tiny", flag]),
        "bench memory probe": lambda: bench.memory_probe(probe),
    }


@pytest.mark.parametrize("amp", [True, False])
def test_every_stage_and_benchmark_sets_the_same_policy(amp, setups, tmp_path, tiny_clip_dir,
                                                        tiny_image_dataset, run_dir):
    """After its setup every stage and benchmark holds the same switches: TF32 with --amp,
    IEEE with --no-amp. Each starts from the opposite setting, so a stage that left them alone
    would keep it and fail here."""
    sae = write_tiny_sae(tmp_path / "sae", tiny_clip_dir)
    expected = ("tf32", "tf32") if amp else ("ieee", "ieee")
    for name, run in stage_setups(tmp_path, tiny_clip_dir, str(tiny_image_dataset), run_dir,
                                  sae, amp).items():
        runs.set_precision(not amp)
        setups.clear()
        with pytest.raises(SetupDone):
            run()
        assert setups == [("cpu", amp, expected)], name


def test_bench_sae_trains_in_ieee_fp32(setups):
    """bench_sae.py trains SAEs only: IEEE fp32, as train_sae.py trains them."""
    runs.set_precision(True)
    with pytest.raises(SetupDone):
        bench_sae.main(["--d", "8", "--atoms", "8", "--active", "2", "--n-train", "64",
                        "--n-val", "16", "--k", "2", "--device", "cpu", "--quiet"])
    assert setups == [("cpu", False, ("ieee", "ieee"))]


def test_set_precision_sets_both_switches():
    runs.set_precision(True)
    assert switches() == ("tf32", "tf32")
    runs.set_precision(False)
    assert switches() == ("ieee", "ieee")


def test_exact_fp32_turns_autocast_and_tf32_off_and_restores_them():
    runs.set_precision(True)
    with torch.autocast("cpu", torch.bfloat16):
        with losses.exact_fp32():
            assert switches() == ("ieee", "ieee") and not torch.is_autocast_enabled("cpu")
        assert switches() == ("tf32", "tf32") and torch.is_autocast_enabled("cpu")
        with pytest.raises(ZeroDivisionError), losses.exact_fp32():
            1 / 0
        assert switches() == ("tf32", "tf32") and torch.is_autocast_enabled("cpu")


def codes_and_terms(sae, h, h0, amp):
    """Everything the stages compute with the SAE, with the forward passes under a bf16 autocast
    or not: its output (training, probe, evaluation, report), a code alone, every regulariser
    term, and the gradient of λ·R (backward outside the autocast, as finetune.py runs it)."""
    h = h.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=amp):
        out = sae(h0)
        terms = losses.regulariser("sae-preserve-remove", h, h0, sae)
        codes = [out.x, out.z, out.x_hat, out.pre, sae.encode(h), sae.decode(out.z)]
        assert (h @ sae.W_enc.T).dtype == (torch.bfloat16 if amp else torch.float32)
    terms["reg"].backward()
    return [*codes, *terms.values(), h.grad]


def test_the_sae_and_the_losses_ignore_an_outer_autocast():
    """Under a bf16 autocast (on the CPU it runs matmuls in bf16: the SAE's codes would change)
    the SAE's outputs, codes and the regulariser's terms and gradient are the fp32 ones, bit
    for bit."""
    torch.manual_seed(0)
    sae = TopKSAE(32, 128, 4)
    h, h0 = torch.randn(16, 32), torch.randn(16, 32)
    for a, b in zip(codes_and_terms(sae, h, h0, False), codes_and_terms(sae, h, h0, True)):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_the_sae_training_step_ignores_an_outer_autocast():
    """train_sae.sae_step (what train_sae.py, bench.py and bench_sae.py run) gives the same
    weights under a bf16 autocast as without: the SAE trains in IEEE fp32."""
    torch.manual_seed(0)
    h = torch.nn.functional.normalize(torch.randn(64, 16), dim=-1)
    results = []
    for amp in (False, True):
        torch.manual_seed(1)
        sae = TopKSAE(16, 64, 4)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        since = torch.full((64,), 10 ** 6)                  # every latent dead: AuxK runs too
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            train_sae.sae_step(sae, opt, h, since, 1000, 1e-3, 0, aux_k=8)
        results.append(copy.deepcopy(sae.state_dict()))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
