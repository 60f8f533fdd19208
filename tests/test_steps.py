"""The recipe's training steps against independent reference steps computed by hand (§3).

test_losses.py checks the loss math; this file checks what the two stages do with it in one
optimiser step, and their learning-rate schedules, the way test_losses.py does: each project
step is compared with a reference written here from the formulas, in float64, on tiny tensors.
The references call nothing of the project's step code (not `sae_step`, `finetune_step`,
`losses.*`, `TopKSAE.remove_parallel_grad` / `normalise_atoms`, `clip_grad_norm_` or an optimiser):
their forward passes are written with loops and masks, their gradients come from autograd on
those, and the parallel-component removal, the clip by total norm, the Adam / AdamW update and
the renormalisation of the atoms are written out below.

    SAE step (train_sae.sae_step), two steps in a row, Adam:
        loss = FVU(x, x̃) + α_aux · AuxK over the latents with since_fired ≥ dead_samples
        g_W_dec[:, j] −= W_dec[:, j] ⟨g_W_dec[:, j], W_dec[:, j]⟩      (parallel part removed)
        g ← g · min(1, c / (‖g‖ + 1e-6))                                 (clip, ‖·‖ over all)
        Adam (bias-corrected), then W_dec[:, j] ← W_dec[:, j] / ‖W_dec[:, j]‖
        since_fired ← 0 where the latent fired on the batch, else since_fired + B (samples)
    fine-tuning step (finetune.finetune_step), 2 micro-batches, AdamW:
        g = Σ_i ∇(CE_i + λ·R_i) / 2,  R = μ·L_res + λ_mask·L_pres (sae-preserve), clip, AdamW

Clipping is checked where it binds (c below the gradient norm: the test asserts it is) and
where it does not. Adam's first step is ≈ lr·sign(g), blind to the gradient's scale, so the
optimisers here use eps of the order of the gradient's entries: the update then depends on the
gradient's size, and a clip applied after the step (or not at all) shows.

Tolerances: the SAE step runs in float64 end to end (1e-10). finetune_step computes the
cross-entropy in float32 (`logits.float()`) whatever the model's dtype, so its comparisons
allow float32 rounding (rtol 1e-5 on weights that move by ~1e-2 relative; measured agreement
~1e-8); every bug the mutation check plants moves them by far more.

scripts/mutation_check.py plants one-line bugs in the steps and schedules and runs this file:
each bug must make a test here fail (docs/reference.md lists them and the result).
"""
import math

import pytest
import torch
import torch.nn as nn

import finetune
import train_sae
from sae import TopKSAE

pytestmark = pytest.mark.usefixtures("one_thread")

SAE_NAMES = ("W_enc", "b_enc", "b_dec", "W_dec")


# ============================================================================================
# Naive float64 references (loops and masks; autograd for the gradients only)
# ============================================================================================

def unit_rows(v):
    return v / v.pow(2).sum(1, keepdim=True).sqrt()


def top_mask(scores, k, allowed=None):
    """(B, n) bool: per row, the k largest scores among the allowed columns (sorted by hand)."""
    B, n = scores.shape
    cols = [i for i in range(n) if allowed is None or allowed[i]]
    keep = torch.zeros(B, n, dtype=torch.bool)
    for b in range(B):
        for i in sorted(cols, key=lambda i: -scores[b, i].item())[:k]:
            keep[b, i] = True
    return keep


def naive_encode(x, P, k):
    """x (B, d) unit rows → (pre, z): pre = W_enc (x − b_dec) + b_enc, z = ReLU on the top k."""
    pre = (x - P["b_dec"]) @ P["W_enc"].T + P["b_enc"]
    return pre, torch.where(top_mask(pre, k), pre.clamp_min(0), torch.zeros_like(pre))


def naive_fvu(x, x_hat):
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def naive_sae_loss(P, h, k, dead, aux_k):
    """(FVU, AuxK, z) of the Top-k SAE with parameters P on raw embeddings h (B, d).
    AuxK: the detached residual e = x − x̃ explained by the top-min(k_aux, #dead) dead latents
    (ReLU, no b_dec), as a fraction of e's variance; 0 when no latent is dead."""
    x = unit_rows(h)
    pre, z = naive_encode(x, P, k)
    x_hat = z @ P["W_dec"].T + P["b_dec"]
    fvu = naive_fvu(x, x_hat)
    n_dead = sum(dead)
    if n_dead == 0:
        return fvu, torch.zeros((), dtype=h.dtype), z
    keep = top_mask(pre, min(aux_k, n_dead), allowed=dead)
    e_hat = torch.where(keep, pre.clamp_min(0), torch.zeros_like(pre)) @ P["W_dec"].T
    return fvu, naive_fvu((x - x_hat).detach(), e_hat), z


def clip_by_total_norm(grads, clip):
    """(clipped grads, norm before): g · min(1, c / (‖g‖ + 1e-6)), ‖g‖ over every tensor
    (PyTorch's clip_grad_norm_ adds 1e-6 to the norm; written out here)."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = min(1.0, clip / (norm + 1e-6))
    return {name: g * scale for name, g in grads.items()}, norm


def adam_update(p, g, state, lr, betas, eps, wd=0.0):
    """One Adam step (AdamW's decoupled decay first when wd > 0), bias-corrected:
    p ← p(1 − lr·wd);  m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²;
    p ← p − lr · (m / (1−β1^t)) / (sqrt(v / (1−β2^t)) + eps)."""
    b1, b2 = betas
    t = state["t"] = state.get("t", 0) + 1
    state["m"] = b1 * state.get("m", torch.zeros_like(p)) + (1 - b1) * g
    state["v"] = b2 * state.get("v", torch.zeros_like(p)) + (1 - b2) * g * g
    p = p * (1 - lr * wd)
    return p - lr * (state["m"] / (1 - b1 ** t)) / ((state["v"] / (1 - b2 ** t)).sqrt() + eps)


def reference_sae_step(P, states, h, since_fired, dead_samples, lr, k, aux_k, aux_coef, clip,
                       betas, eps):
    """One SAE step by hand. P: name → float64 tensor (updated copy returned). Returns
    (P, since_fired list, fvu, auxk, grad norm before clipping)."""
    n = P["W_enc"].shape[0]
    leaves = {name: t.clone().requires_grad_(True) for name, t in P.items()}
    dead = [since_fired[i] >= dead_samples for i in range(n)]
    fvu, auxk, z = naive_sae_loss(leaves, h, k, dead, aux_k)
    grads = dict(zip(leaves, torch.autograd.grad(fvu + aux_coef * auxk, list(leaves.values()))))
    W, gW = P["W_dec"], grads["W_dec"].clone()
    for j in range(n):                                     # drop each atom's parallel part
        gW[:, j] = gW[:, j] - W[:, j] * (gW[:, j] * W[:, j]).sum()
    grads["W_dec"] = gW
    grads, norm = clip_by_total_norm(grads, clip)
    new = {name: adam_update(P[name], grads[name], states[name], lr, betas, eps) for name in P}
    W = new["W_dec"].clone()
    for j in range(n):                                     # atoms back to unit norm
        W[:, j] = W[:, j] / W[:, j].pow(2).sum().sqrt()
    new["W_dec"] = W
    fired = [bool((z[:, i] > 0).any()) for i in range(n)]
    since = [0 if fired[i] else since_fired[i] + len(h) for i in range(n)]
    return new, since, fvu.item(), auxk.item(), norm


# ============================================================================================
# The SAE step (train_sae.sae_step)
# ============================================================================================

D, N_LAT, K = 6, 10, 2          # embedding width, latents, active latents


def make_sae(seed=0, b_enc=None, k=K):
    """A float64 TopKSAE with random (untied) weights, unit atoms; b_enc overridable."""
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(D, N_LAT, k).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(N_LAT, D, generator=g, dtype=torch.float64))
        sae.b_enc.copy_(0.3 * torch.randn(N_LAT, generator=g, dtype=torch.float64)
                        if b_enc is None else torch.as_tensor(b_enc, dtype=torch.float64))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=g, dtype=torch.float64))
        W = torch.randn(D, N_LAT, generator=g, dtype=torch.float64)
        sae.W_dec.copy_(W / W.norm(dim=0))
    return sae


def sae_params(sae):
    return {name: getattr(sae, name).detach().clone() for name in SAE_NAMES}


def batches(seed, B=7, count=2):
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(B, D, generator=g, dtype=torch.float64) for _ in range(count)]


# since_fired before the first step, against a window of 10 samples: latents 3, 5, 7, 8 are
# dead (10, 11, 40, 10 samples), latent 2 is one sample short (9) and is not.
SINCE0 = [0, 4, 9, 10, 0, 11, 2, 40, 10, 0]
WINDOW = 10
BETAS, EPS = (0.9, 0.999), 0.05      # eps ~ the gradient's entries: the update sees its size


@pytest.mark.parametrize("binds", [True, False], ids=["clip-binds", "clip-does-not-bind"])
def test_sae_step_equals_the_reference_step(binds):
    """Two sae_step calls in a row (Adam, AuxK on, α_aux = 0.25) equal two reference steps:
    weights, fvu, auxk and the dead-latent counters. The clip threshold is set below both
    steps' gradient norms (binds) or far above them (does not)."""
    lr, aux_k, aux_coef = 0.02, N_LAT, 0.25
    xs = batches(1)
    clip = 1.0 if binds else 50.0              # 1.0: the default --clip-grad
    sae = make_sae(0)
    P, states, since = sae_params(sae), {name: {} for name in SAE_NAMES}, list(SINCE0)
    expected, norms = [], []
    for h in xs:
        P, since, fvu, auxk, norm = reference_sae_step(P, states, h, since, WINDOW, lr, K, aux_k,
                                                       aux_coef, clip, BETAS, EPS)
        expected.append((dict(P), list(since), fvu, auxk))
        norms.append(norm)
    assert all((norm > 2 * clip) if binds else (norm < clip / 2) for norm in norms), norms
    assert expected[0][3] > 0.1                 # AuxK is on (dead latents, a real term)

    opt = torch.optim.Adam(sae.parameters(), lr=1.0, betas=BETAS, eps=EPS)  # lr set per step
    since_t = torch.tensor(SINCE0)
    for step, (h, (P_ref, since_ref, fvu_ref, auxk_ref)) in enumerate(zip(xs, expected)):
        since_t, fvu, auxk = train_sae.sae_step(
            sae, opt, h, since_fired=since_t, dead_samples=WINDOW, lr=lr, step=step,
            aux_k=aux_k, aux_coef=aux_coef, clip=clip)
        assert fvu.item() == pytest.approx(fvu_ref, rel=1e-12)
        assert auxk.item() == pytest.approx(auxk_ref, rel=1e-12)
        assert since_t.tolist() == since_ref
        for name in SAE_NAMES:
            torch.testing.assert_close(getattr(sae, name).detach(), P_ref[name], rtol=1e-10,
                                       atol=1e-12, msg=f"step {step}: {name}")
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(N_LAT, dtype=torch.float64))


def test_sae_step_auxk_enters_the_loss_weighted_by_alpha():
    """With plain SGD and no clipping the step moves the encoder by −lr·∂(FVU + α·AuxK)/∂θ:
    at α = 0 by FVU's gradient alone, and the part AuxK adds is α times AuxK's own gradient
    (both from the reference), for α = 1/32 (the default) and α = 0.5. The returned auxk is
    AuxK itself, unweighted."""
    lr = 0.1
    h = batches(2, B=9, count=1)[0]
    P0 = sae_params(make_sae(3))
    dead = [s >= WINDOW for s in SINCE0]
    leaves = {name: t.clone().requires_grad_(True) for name, t in P0.items()}
    fvu_ref, auxk_ref, _ = naive_sae_loss(leaves, h, K, dead, N_LAT)
    grads = {part: dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()),
                                                        retain_graph=True)))
             for part, loss in (("fvu", fvu_ref), ("auxk", auxk_ref))}
    fvu_ref, auxk_ref = fvu_ref.item(), auxk_ref.item()
    for alpha in (0.0, 1 / 32, 0.5):
        sae = make_sae(3)
        opt = torch.optim.SGD(sae.parameters(), lr=lr)
        _, fvu, auxk = train_sae.sae_step(
            sae, opt, h, since_fired=torch.tensor(SINCE0), dead_samples=WINDOW, lr=lr, step=0,
            aux_k=N_LAT, aux_coef=alpha, clip=1e6)
        assert fvu.item() == pytest.approx(fvu_ref, rel=1e-12)
        assert auxk.item() == pytest.approx(auxk_ref, rel=1e-12)        # unweighted
        for name in ("W_enc", "b_enc", "b_dec"):                         # no renormalisation
            moved = getattr(sae, name).detach() - P0[name]
            g_fvu, g_aux = grads["fvu"][name], grads["auxk"][name]
            # the AuxK part of the update is a real share of it (else α could not show)
            assert g_aux.norm() > 0.05 * g_fvu.norm()
            torch.testing.assert_close(moved, -lr * (g_fvu + alpha * g_aux), rtol=1e-10,
                                       atol=1e-13, msg=f"α = {alpha}: {name}")


def test_dead_latent_window_counts_samples():
    """A latent is dead (AuxK trains it) once it has not fired for `dead_samples` samples —
    counted in samples (B = 3 per step), not steps; one sample fewer does not count.

    Latent 0 always fires (b_enc = 10, k = 1); latent 1 never does but has a positive
    pre-activation (b_enc = 3), so once it is dead AuxK is > 0; the rest never reach ReLU's
    positive side (b_enc = −10), so they add nothing to AuxK. Every latent but 0 shares
    latent 1's count: until it reaches the window no latent is dead, and AuxK is exactly 0."""
    B = 3
    b_enc = [10.0, 3.0] + [-10.0] * (N_LAT - 2)
    for window, first_dead_step in ((6, 2), (7, 3), (5, 2), (4, 2), (3, 1)):
        sae = make_sae(4, b_enc=b_enc, k=1)
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        since = torch.zeros(N_LAT, dtype=torch.long)
        for step, h in enumerate(batches(5, B=B, count=4)):
            before = since[1].item()
            since, _, auxk = train_sae.sae_step(
                sae, opt, h, since_fired=since, dead_samples=window, lr=1e-3, step=step,
                aux_k=N_LAT, aux_coef=1 / 32, clip=1.0)
            assert before == B * step                         # samples without firing
            assert since[0].item() == 0 and since.tolist()[1:] == [B * (step + 1)] * (N_LAT - 1)
            dead = step >= first_dead_step                    # i.e. B·step ≥ window
            assert dead == (before >= window)
            assert (auxk.item() > 1e-3) if dead else (auxk.item() == 0), \
                f"window {window}, step {step}: {before} samples since firing, auxk {auxk}"


# ============================================================================================
# The fine-tuning step (finetune.finetune_step)
# ============================================================================================

D_IN, D_EMB, CLASSES, SCALE = 7, D, 3, 10.0


class TinyClassifier(nn.Module):
    """A linear image 'tower' h = A x + a and a cosine head logits = s·normalise(h) Wᵀ + b
    (W's rows start at unit norm, as class text embeddings): (logits, h), as the zero-shot
    classifier returns them; `.visual` is the tower."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.visual = nn.Linear(D_IN, D_EMB).double()
        self.W = nn.Parameter(unit_rows(torch.randn(CLASSES, D_EMB, generator=g,
                                                    dtype=torch.float64)))
        self.b = nn.Parameter(0.1 * torch.randn(CLASSES, generator=g, dtype=torch.float64))
        with torch.no_grad():
            self.visual.weight.copy_(torch.randn(D_EMB, D_IN, generator=g, dtype=torch.float64))
            self.visual.bias.copy_(torch.randn(D_EMB, generator=g, dtype=torch.float64))

    def forward(self, x):
        h = self.visual(x)
        return SCALE * (h / h.norm(dim=-1, keepdim=True)) @ self.W.T + self.b, h


def reference_ft_loss(P, x, y, h0, S, args):
    """(loss, terms, correct) of one micro-batch by hand: CE with label smoothing ε,
    −Σ_c q_c log softmax_c, q = (1 − ε)·onehot + ε/C; R = μ·L_res + λ_mask·L_pres on unit
    embeddings with the frozen SAE S (its tensors, no gradient); loss = CE + λ·R."""
    h = x @ P["visual.weight"].T + P["visual.bias"]
    logits = SCALE * unit_rows(h) @ P["W"].T + P["b"]
    logp = logits - logits.exp().sum(1, keepdim=True).log()
    eps = args.label_smoothing
    q = torch.full_like(logp, eps / CLASSES)
    q[torch.arange(len(y)), y] += 1 - eps
    ce = -(q * logp).sum(1).mean()
    u, u0 = unit_rows(h), unit_rows(h0)
    _, z = naive_encode(u, S, S["k"])
    with torch.no_grad():
        _, z0 = naive_encode(u0, S, S["k"])
    res = ((u - u0) - (z - z0) @ S["W_dec"].T).pow(2).mean()
    pres = (torch.where(z0 == 0, z.abs(), torch.zeros_like(z))).mean()
    reg = args.lam * (args.mu * res + args.lam_mask * pres)
    correct = int((logits.argmax(1) == y).sum())
    return ce + reg, {"ce": ce.item(), "res": res.item(), "pres": pres.item(),
                      "reg": reg.item()}, correct


def reference_ft_step(P, micro_batches, h0_table, S, args, betas, eps):
    """One fine-tuning step by hand: gradients of each micro-batch's loss / accum summed,
    clipped by total norm, one AdamW step. Returns (P, terms (means), acc %, grad norm)."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in P.items()}
    grads = {name: torch.zeros_like(t) for name, t in P.items()}
    terms, correct, seen = {}, 0, 0
    for x, y, idx in micro_batches:
        loss, t, c = reference_ft_loss(leaves, x, y, h0_table[idx], S, args)
        for name, g in zip(leaves, torch.autograd.grad(loss, list(leaves.values()))):
            grads[name] += g / args.accum_steps
        for name, v in t.items():
            terms[name] = terms.get(name, 0.0) + v / args.accum_steps
        correct, seen = correct + c, seen + len(y)
    grads, norm = clip_by_total_norm(grads, args.clip_grad)
    new = {name: adam_update(P[name], grads[name], {}, args.lr, betas, eps, args.wd)
           for name in P}
    return new, terms, 100 * correct / seen, norm


def ft_args(**overrides):
    """finetune.py's settings (its parser's defaults) with `overrides`."""
    args = finetune.parse_args(["--model", "unused", "--train-data", "unused", "--out", "unused",
                                "--device", "cpu"])
    for name, value in overrides.items():
        setattr(args, name, value)
    return args


def ft_case(seed=0):
    """(model, frozen SAE, 2 micro-batches of 4 (x, y, idx), h0 table (8, d))."""
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(8, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (8,), generator=g)
    idx = torch.randperm(8, generator=g)
    h0_table = torch.randn(8, D_EMB, generator=g, dtype=torch.float64)
    sae = make_sae(seed + 7).requires_grad_(False)
    mbs = [(x[:4], y[:4], idx[:4]), (x[4:], y[4:], idx[4:])]
    return TinyClassifier(seed), sae, mbs, h0_table


FT_EPS = 1e-2


@pytest.mark.parametrize("binds", [True, False], ids=["clip-binds", "clip-does-not-bind"])
def test_finetune_step_with_accumulation_equals_the_reference_step(binds):
    """finetune_step over 2 micro-batches (--accum-steps 2; sae-preserve with h0 read from a
    table, label smoothing 0.1, AdamW with weight decay) equals the reference step: the new
    weights, the logged terms (means over the micro-batches), the accuracy and the gradient
    norm before clipping."""
    clip = 0.5 if binds else 50.0
    args = ft_args(reg="sae-preserve", accum_steps=2, batch_size=4, amp=False,
                   label_smoothing=0.1, lam=2.0, mu=1.0, lam_mask=0.5, sae_space="unit",
                   clip_grad=clip, lr=0.03, wd=0.1)
    clf, sae, mbs, h0_table = ft_case()
    P = {name: p.detach().clone() for name, p in clf.named_parameters()}
    S = {name: getattr(sae, name).detach().clone() for name in SAE_NAMES}
    S["k"] = sae.k
    P_ref, terms_ref, acc_ref, norm_ref = reference_ft_step(P, mbs, h0_table, S, args,
                                                            BETAS, FT_EPS)
    assert (norm_ref > 2 * clip) if binds else (norm_ref < clip / 2), norm_ref
    assert terms_ref["reg"] > 0.1 * terms_ref["ce"] and terms_ref["pres"] > 0  # R matters

    opt = torch.optim.AdamW(clf.parameters(), lr=args.lr, betas=BETAS, eps=FT_EPS,
                            weight_decay=args.wd)
    result = finetune.finetune_step(clf, f0=None, sae=sae, opt=opt, micro_batches=mbs,
                                    args=args, h0_cache=h0_table)
    assert set(result.terms) == set(terms_ref)
    for name, value in terms_ref.items():
        assert result.terms[name] == pytest.approx(value, rel=1e-5), name
    assert result.acc == pytest.approx(acc_ref) and result.images == 8
    assert result.grad_norm == pytest.approx(norm_ref, rel=1e-5)
    for name, p in clf.named_parameters():
        assert not torch.allclose(p.detach(), P[name], rtol=1e-3)        # it did move
        torch.testing.assert_close(p.detach(), P_ref[name], rtol=1e-5, atol=1e-8, msg=name)


# ============================================================================================
# The learning-rate schedules, value by value
# ============================================================================================

def test_sae_lr_schedule_values():
    """train_sae.lr_at = lr · min((s + 1) / warmup, 1, (total − s) / decay): linear warm-up
    that reaches lr at the warm-up's last step, constant, then linear decay over the last
    `decay` steps (lr / decay at the last step, 0 one step after it)."""
    lr, warmup, total, decay = 2e-3, 10, 100, 20
    expected = {0: lr / 10,            # first step: 1/10 of the way up, not 0
                4: lr * 5 / 10,
                9: lr,                 # last warm-up step
                10: lr, 50: lr,        # midpoint of the run
                79: lr, 80: lr,        # the decay's first step: (100 − 80) / 20 = 1
                81: lr * 19 / 20, 90: lr * 10 / 20,
                99: lr / 20,           # last step
                100: 0.0}
    for step, value in expected.items():
        assert train_sae.lr_at(step, lr, warmup, total, decay) == pytest.approx(
            value, rel=1e-12, abs=0), step
    # no warm-up / no decay: the full lr from the first step / up to the last
    assert train_sae.lr_at(0, lr, 0, total, decay) == pytest.approx(lr)
    assert train_sae.lr_at(99, lr, warmup, total, 0) == pytest.approx(lr)


def test_finetune_lr_schedule_values():
    """finetune.lr_at: linear warm-up lr·(s + 1)/warmup, then cosine lr·½(1 + cos(π·p)),
    p = (s − warmup) / (total − warmup), reaching 0 at the end of the run (§3, WiSE-FT)."""
    lr, warmup, total = 1e-3, 10, 110
    args = ft_args(lr=lr, warmup_steps=warmup)

    def cosine(p):
        return lr * 0.5 * (1 + math.cos(math.pi * p))

    expected = {0: lr / 10,            # first step: 1/10 of the way up, not 0
                4: lr * 5 / 10,
                9: lr,                 # last warm-up step
                10: lr,                # the cosine's start (p = 0)
                35: cosine(0.25),      # = lr · 0.8536
                60: lr / 2,            # the cosine's midpoint (p = ½)
                85: cosine(0.75),      # = lr · 0.1464
                109: cosine(0.99),     # last step: = lr · 2.47e-4
                110: 0.0,              # the end of the run: 0
                120: 0.0}              # (and past it)
    for step, value in expected.items():
        assert finetune.lr_at(step, args, total) == pytest.approx(value, rel=1e-12,
                                                                  abs=1e-18), step
    assert cosine(0.25) == pytest.approx(lr * 0.85355339, rel=1e-8)
    assert cosine(0.99) == pytest.approx(lr * 2.4672e-4, rel=1e-4)
    values = [finetune.lr_at(s, args, total) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(values[warmup:], values[warmup + 1:]))  # decreasing
    # no warm-up: the full lr at the first step
    assert finetune.lr_at(0, ft_args(lr=lr, warmup_steps=0), total) == pytest.approx(lr)
