"""Tests of the loss and metric math (losses.py) and the Top-k SAE (sae.py).

Each fast path is compared with an independent, naive float64 implementation written with
Python loops / NumPy on random tensors, including awkward sizes (d not a power of two, k = 1,
k = n, batch 1); then invariants, gradients and the SAE's training-step constraints. The controls
(PCA basis, LDIFS) at the end: the same, plus the rule that picks the basis's size.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import losses as L
from sae import PCABasis, TopKSAE, fit_pca, geometric_median, matched_components, pca_fvu_curve

torch.manual_seed(0)
SIZES = [(1, 5, 7, 1), (3, 10, 13, 13), (4, 12, 30, 4), (7, 33, 50, 8)]   # (B, d, n, k)


def rand_sae(d, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = TopKSAE(d, n, k).double()
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
        sae.normalise_atoms()
    return sae


# ---------------------------------------------------------------- naive references (NumPy, loops)

def naive_encode(x, W_enc, b_enc, b_dec, k):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((x.shape[0], W_enc.shape[0]))
    for b in range(x.shape[0]):
        xb = x[b] / math.sqrt(sum(v * v for v in x[b]))
        pre = [sum(W_enc[i, j] * (xb[j] - b_dec[j]) for j in range(len(xb))) + b_enc[i]
               for i in range(W_enc.shape[0])]
        for i in sorted(range(len(pre)), key=lambda i: -pre[i])[:k]:
            out[b, i] = max(pre[i], 0.0)
    return out


def naive_mean(f, rows):
    vals = [f(v) for row in rows for v in row]
    return sum(vals) / len(vals)


def np64(*ts):
    return [t.detach().double().numpy() for t in ts]


# ---------------------------------------------------------------- each term vs the naive version

@pytest.mark.parametrize("B,d,n,k", SIZES)
def test_topk_encode_matches_naive(B, d, n, k):
    sae = rand_sae(d, n, k)
    h = torch.randn(B, d, dtype=torch.float64) * 3
    z, _ = L.topk_encode(h, sae.W_enc, sae.b_enc, sae.b_dec, k)
    ref = naive_encode(*np64(h, sae.W_enc, sae.b_enc, sae.b_dec), k)
    np.testing.assert_allclose(z.detach().numpy(), ref, atol=1e-10)


@pytest.mark.parametrize("B,d,n,k", SIZES)
def test_regulariser_terms_match_naive(B, d, n, k):
    sae = rand_sae(d, n, k)
    h0 = torch.randn(B, d, dtype=torch.float64)
    h = h0 + 0.3 * torch.randn(B, d, dtype=torch.float64)
    x, x0 = np64(F.normalize(h, dim=-1), F.normalize(h0, dim=-1))
    W_enc, b_enc, b_dec, W_dec = np64(sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec)
    z, z0 = naive_encode(x, W_enc, b_enc, b_dec, k), naive_encode(x0, W_enc, b_enc, b_dec, k)
    dx, dz = x - x0, z - z0
    res_rows = [[dx[b, j] - sum(W_dec[j, i] * dz[b, i] for i in range(n)) for j in range(d)]
                for b in range(B)]
    ref = {
        "res": naive_mean(lambda v: v * v, res_rows),
        "sparse": naive_mean(abs, dz),
        "pres": naive_mean(lambda v: v, [[abs(z[b, i]) if z0[b, i] == 0 else 0.0
                                          for i in range(n)] for b in range(B)]),
        "remove": naive_mean(lambda v: v, [[max(z0[b, i] - z[b, i], 0.0) if z0[b, i] > 0 else 0.0
                                            for i in range(n)] for b in range(B)]),
        "l2": naive_mean(lambda v: v * v, dx),
        "l1": naive_mean(abs, dx),
    }
    got = {**L.regulariser("sae-sparse", h, h0, sae),
           **L.regulariser("sae-preserve-remove", h, h0, sae),
           **L.regulariser("l2", h, h0), **L.regulariser("l1", h, h0)}
    for name, value in ref.items():
        assert got[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_weighted_total_is_the_documented_sum():
    sae = rand_sae(12, 30, 4)
    h0, h = torch.randn(6, 12, dtype=torch.float64), torch.randn(6, 12, dtype=torch.float64)
    w = dict(lam=70.0, mu=0.7, lam_l1=0.3, lam_mask=10.0, lam_remove=0.5)
    t = L.regulariser("sae-preserve-remove", h, h0, sae, **w)
    expect = w["lam"] * (w["mu"] * t["res"] + w["lam_mask"] * t["pres"]
                         + w["lam_remove"] * t["remove"])
    assert t["reg"].item() == pytest.approx(expect.item(), rel=1e-12)
    t = L.regulariser("sae-sparse", h, h0, sae, **w)
    expect = w["lam"] * (w["mu"] * t["res"] + w["lam_l1"] * t["sparse"])
    assert t["reg"].item() == pytest.approx(expect.item(), rel=1e-12)
    t = L.regulariser("l2", h, h0, lam=5.0)
    assert t["reg"].item() == pytest.approx(5.0 * t["l2"].item())
    assert L.regulariser("none", h, h0)["reg"].item() == 0.0
    with pytest.raises(ValueError, match="unknown regulariser"):
        L.regulariser("l3", h, h0)
    with pytest.raises(ValueError, match="needs a trained SAE"):
        L.regulariser("sae-preserve", h, h0)


@pytest.mark.parametrize("B,C,eps", [(1, 2, 0.0), (5, 7, 0.0), (6, 3, 0.1)])
def test_cross_entropy_matches_naive_and_runs_bf16_logits_in_fp32(B, C, eps):
    g = torch.Generator().manual_seed(B)
    logits, y = torch.randn(B, C, generator=g) * 3, torch.randint(0, C, (B,), generator=g)
    ln = logits.double().numpy()
    ref = 0.0
    for b in range(B):
        logp = ln[b] - math.log(sum(math.exp(v) for v in ln[b]))
        target = [eps / C + (1 - eps) * (c == int(y[b])) for c in range(C)]
        ref -= sum(t * lp for t, lp in zip(target, logp)) / B
    assert L.cross_entropy(logits, y, eps).item() == pytest.approx(ref, rel=1e-5)
    half = L.cross_entropy(logits.bfloat16(), y, eps)
    assert half.dtype == torch.float32       # bf16 logits: the loss itself is fp32
    assert half.item() == pytest.approx(
        F.cross_entropy(logits.bfloat16().float(), y, label_smoothing=eps).item(), rel=1e-6)


def test_fvu_and_auxk_match_naive():
    x, xh = torch.randn(9, 11, dtype=torch.float64), torch.randn(9, 11, dtype=torch.float64)
    xn, xhn = np64(x, xh)
    ref = ((xn - xhn) ** 2).sum() / ((xn - xn.mean(0)) ** 2).sum()
    assert L.fvu(x, xh).item() == pytest.approx(ref, rel=1e-12)
    assert L.auxk_loss(x, xh).item() == pytest.approx(ref, rel=1e-12)
    assert L.auxk_loss(x, None).item() == 0.0


@pytest.mark.parametrize("k_aux", [1, 3, 100])
def test_auxk_reconstruction_matches_naive(k_aux):
    B, d, n = 5, 7, 20
    pre, W_dec = torch.randn(B, n, dtype=torch.float64), torch.randn(d, n, dtype=torch.float64)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[[1, 4, 5, 11, 19]] = True
    got = L.auxk_reconstruction(pre, dead, W_dec, k_aux)
    pn, Wn = np64(pre, W_dec)
    ref = np.zeros((B, d))
    for b in range(B):
        cand = sorted([i for i in range(n) if dead[i]], key=lambda i: -pn[b, i])[:k_aux]
        for i in cand:
            ref[b] += max(pn[b, i], 0) * Wn[:, i]
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    assert L.auxk_reconstruction(pre, torch.zeros(n, dtype=torch.bool), W_dec, k_aux) is None


def test_auxk_finite_when_residual_constant():
    e = torch.ones(4, 3)                       # zero variance: 0/0 must not become NaN
    assert torch.isfinite(L.auxk_loss(e, torch.zeros(4, 3)))


# ---------------------------------------------------------------- invariants

def test_residual_alignment_zero_in_span_and_orthogonal_part_outside():
    B, d, n = 4, 10, 6                            # n < d: atoms span a 6-dim subspace
    W_dec = torch.randn(d, n, dtype=torch.float64)
    dz = torch.randn(B, n, dtype=torch.float64)
    assert L.residual_alignment(dz @ W_dec.T, dz, W_dec).item() == pytest.approx(0, abs=1e-24)
    Q, _ = torch.linalg.qr(torch.cat([W_dec, torch.randn(d, d - n, dtype=torch.float64)], 1))
    orth = torch.randn(B, d - n, dtype=torch.float64) @ Q[:, n:].T   # ⟂ to every atom
    got = L.residual_alignment(dz @ W_dec.T + orth, dz, W_dec).item()
    assert got == pytest.approx(orth.pow(2).sum().item() / (B * d), rel=1e-10)


def test_feature_preservation_zero_on_same_support_else_off_support_mass():
    z0 = torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 1.0]])
    same_support = torch.tensor([[0.0, 5.0, 0.1, 0.0], [1.0, 0.0, 0.0, 9.0]])
    assert L.feature_preservation(same_support, z0).item() == 0.0
    z = torch.tensor([[0.5, 1.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.25]])
    assert L.feature_preservation(z, z0).item() == pytest.approx((0.5 + 2.0) / 8)


def test_feature_removal_counts_only_lost_zero_shot_mass():
    z0 = torch.tensor([[0.0, 1.0, 2.0]])
    assert L.feature_removal(torch.tensor([[9.0, 1.0, 3.0]]), z0).item() == 0.0
    assert L.feature_removal(torch.tensor([[0.0, 0.25, 0.0]]), z0).item() == pytest.approx(2.75 / 3)


def test_l2_l1_zero_for_identical_and_scale_invariant():
    h = torch.randn(5, 9)
    for name in ("l2", "l1"):
        assert L.regulariser(name, h, h.clone())[name].item() == 0.0
        assert L.regulariser(name, 7 * h, h)[name].item() == pytest.approx(0, abs=1e-6)


def test_sae_terms_zero_when_nothing_changed():
    sae, h = rand_sae(12, 30, 4), torch.randn(5, 12, dtype=torch.float64)
    t = L.regulariser("sae-preserve-remove", h, h.clone(), sae)
    assert all(v.item() == 0.0 for v in t.values())


# ---------------------------------------------------------------- gradients

@pytest.mark.parametrize("name", ["l2", "l1", "sae-sparse", "sae-preserve", "sae-preserve-remove"])
def test_gradcheck_wrt_finetuned_embedding(name):
    sae = rand_sae(6, 15, 3, seed=1)
    h0 = torch.randn(3, 6, dtype=torch.float64)
    h = (h0 + 0.5 * torch.randn(3, 6, dtype=torch.float64)).requires_grad_()
    # away from kinks: TopK ties / ReLU zeros / |.| at 0 are measure-zero for random inputs
    assert torch.autograd.gradcheck(lambda h: L.regulariser(name, h, h0, sae, lam=2.0)["reg"], (h,))


@pytest.mark.parametrize("name", ["l2", "sae-sparse", "sae-preserve-remove"])
def test_no_gradient_reaches_zero_shot_side_or_sae(name):
    sae = rand_sae(8, 20, 4)
    h0 = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    h = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    L.regulariser(name, h, h0, sae)["reg"].backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    assert h0.grad is None
    assert all(p.grad is None for p in sae.parameters())


# ---------------------------------------------------------------- the authors' objective (space="raw")
# A reference written from the authors' published training code (their SAE encode / decode and
# the loss of each reg type), independent of losses.py: their encoder is a bias-free linear map
# of (x − b_pre), TopK keeps the k largest pre-activations as they are (no ReLU), decode is
# W_dec z + b_pre; R is applied to the raw image features (their default normalize=False).

AUTHORS_REG = {"l2": "mse", "l1": "l1", "sae-sparse": "sae", "sae-preserve": "sae_mask",
               "sae-preserve-remove": "sae_add_remove"}


def authors_topk(pre, k):
    """Their TopK: keep the k largest entries of each row, zero the rest (values unchanged)."""
    mask = torch.zeros_like(pre).scatter(-1, pre.topk(k, dim=-1).indices, 1.0)
    return pre * mask


def authors_objective(reg_type, feats, old, encode, W_dec, b_pre, w):
    """λ · representation_loss of their training step, for one reg type; w = their weights."""
    if reg_type == "mse":
        return w["lam"] * ((feats - old) ** 2).mean()
    if reg_type == "l1":
        return w["lam"] * (feats - old).abs().mean()
    with torch.no_grad():
        s0 = encode(old)
    s = encode(feats)
    decode = lambda z: z @ W_dec.T + b_pre                          # noqa: E731
    residual = (feats - old) - (decode(s) - decode(s0))
    loss = w["mu"] * residual.pow(2).mean()
    if reg_type == "sae":
        loss = loss + w["lam_l1"] * (s - s0).abs().mean(dim=-1).mean()
    else:
        mask = (s0 != 0).double()
        loss = loss + w["lam_mask"] * ((1 - mask) * s.abs()).mean()
        if reg_type == "sae_add_remove":
            loss = loss + w["lam_remove"] * (mask * torch.relu(s0 - s)).mean()
    return w["lam"] * loss


def clip_scale_pair(B, d, seed):
    """(h, h0): raw embeddings of norm ≈ 10, as CLIP ViT-B's."""
    g = torch.Generator().manual_seed(seed)
    h0 = torch.randn(B, d, generator=g, dtype=torch.float64) * 10 / math.sqrt(d)
    return h0 + 0.3 * torch.randn(B, d, generator=g, dtype=torch.float64), h0


def reg_and_grad(fn, h):
    h = h.clone().requires_grad_()
    value = fn(h)
    value.backward()
    return value.detach(), h.grad


def assert_raw_equals_authors(name, sae, h, h0, encode, w, rel, rtol, atol):
    """space="raw" with weights w: the same loss (to rel) and gradient (rtol, atol) as the
    authors' objective for regulariser `name` with encoder `encode`; the loss not zero."""
    ours, g_ours = reg_and_grad(lambda x: L.regulariser(name, x, h0, sae, space="raw", **w)["reg"], h)
    ref, g_ref = reg_and_grad(lambda x: authors_objective(AUTHORS_REG[name], x, h0, encode,
                                                          sae.W_dec.detach(),
                                                          sae.b_dec.detach(), w), h)
    assert ours.item() == pytest.approx(ref.item(), rel=rel) and ref.item() > 0
    torch.testing.assert_close(g_ours, g_ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(AUTHORS_REG))
def test_raw_space_equals_the_authors_objective(name):
    """An SAE of the authors' family (b_enc = 0; every row's top-k pre-activations positive, so
    our ReLU is idle): space="raw" with AUTHORS_WEIGHTS gives their loss and their gradient."""
    sae = rand_sae(24, 96, 5, seed=3)
    with torch.no_grad():
        sae.b_enc.zero_()
    h, h0 = clip_scale_pair(6, 24, seed=4)
    for v in (h, h0):                             # the precondition that makes them one family
        assert ((v - sae.b_dec) @ sae.W_enc.T).topk(5, dim=-1).values.min() > 0
    encode = lambda x: authors_topk((x - sae.b_dec) @ sae.W_enc.detach().T, sae.k)  # noqa: E731
    assert_raw_equals_authors(name, sae, h, h0, encode, L.AUTHORS_WEIGHTS,
                              rel=1e-12, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["sae-sparse", "sae-preserve", "sae-preserve-remove"])
def test_raw_space_applies_our_encoder_as_the_authors_apply_theirs(name):
    """Our SAE (b_enc ≠ 0, some top-k pre-activations negative, so ReLU zeroes them) in the
    authors' formula: their loss with the naive raw encoder ReLU(TopK(W_enc(h − b_dec) + b_enc))."""
    sae = rand_sae(12, 40, 6, seed=5)
    with torch.no_grad():
        sae.b_enc.mul_(8.0).sub_(12.0)
    h, h0 = clip_scale_pair(5, 12, seed=6)
    pre0 = (h0 - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = pre0.topk(6, dim=-1).values
    assert (top <= 0).any() and (top > 0).any()         # ReLU matters in this case

    def naive_raw(x):  # loops over NumPy, no normalisation; rows one by one
        W_enc, b_enc, b_dec = np64(sae.W_enc, sae.b_enc, sae.b_dec)
        out = np.zeros((x.shape[0], W_enc.shape[0]))
        for b, row in enumerate(x.detach().numpy()):
            pre = W_enc @ (row - b_dec) + b_enc
            for i in np.argsort(-pre)[:sae.k]:
                out[b, i] = max(pre[i], 0.0)
        keep = torch.from_numpy(out != 0)     # the active set; values carry x's gradient
        pre_t = (x - sae.b_dec.detach()) @ sae.W_enc.detach().T + sae.b_enc.detach()
        return torch.where(keep, pre_t, torch.zeros_like(pre_t))

    assert_raw_equals_authors(name, sae, h, h0, naive_raw, dict(L.AUTHORS_WEIGHTS, lam_l1=0.3),
                              rel=1e-10, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(AUTHORS_REG))
def test_unit_and_raw_spaces_coincide_on_unit_norm_inputs(name):
    sae = rand_sae(16, 48, 4, seed=7)
    h, h0 = (F.normalize(v, dim=-1) for v in clip_scale_pair(5, 16, seed=8))
    unit, g_unit = reg_and_grad(lambda x: L.regulariser(name, x, h0, sae, space="unit")["reg"], h)
    raw, g_raw = reg_and_grad(lambda x: L.regulariser(name, x, h0, sae, space="raw")["reg"], h)
    assert unit.item() == pytest.approx(raw.item(), rel=1e-9) and unit.item() > 0
    # the gradients differ by the normalisation's Jacobian at ||h|| = 1: its tangential projection
    tangential = lambda g: g - (g * h).sum(-1, keepdim=True) * h    # noqa: E731
    torch.testing.assert_close(g_unit, tangential(g_raw), rtol=1e-8, atol=1e-12)


def test_raw_space_on_clip_scale_inputs_is_another_objective():
    """At ||h|| ≈ 10 the raw SAE code is not the unit one (b_dec is on the unit scale), so the
    two spaces are different objectives, not a rescaling of each other."""
    sae = rand_sae(24, 96, 5, seed=3)
    h, h0 = clip_scale_pair(8, 24, seed=9)
    raw_support = L.topk_encode(h, sae.W_enc, sae.b_enc, sae.b_dec, 5, normalise=False)[0] > 0
    unit_support = L.topk_encode(h, sae.W_enc, sae.b_enc, sae.b_dec, 5)[0] > 0
    assert (raw_support != unit_support).any(-1).sum() >= 4
    with pytest.raises(ValueError, match="unknown space"):
        L.regulariser("l2", h, h0, space="Raw")


# ---------------------------------------------------------------- the SAE module

@pytest.mark.parametrize("B,d,n,k", SIZES)
def test_sae_code_sparse_nonnegative_and_scale_invariant(B, d, n, k):
    sae = rand_sae(d, n, k)
    h = torch.randn(B, d, dtype=torch.float64)
    z = sae.encode(h)
    assert ((z != 0).sum(-1) <= k).all() and (z >= 0).all()
    torch.testing.assert_close(sae.encode(12.5 * h), z)


def test_sae_decode_is_affine():
    sae = rand_sae(9, 20, 5)
    a, b = torch.rand(3, 20, dtype=torch.float64), torch.rand(3, 20, dtype=torch.float64)
    torch.testing.assert_close(sae.decode(0.3 * a + 0.7 * b),
                               0.3 * sae.decode(a) + 0.7 * sae.decode(b))
    torch.testing.assert_close(sae.decode(torch.zeros(1, 20, dtype=torch.float64))[0], sae.b_dec)


def test_sae_save_load_round_trip_exact(tmp_path):
    sae = rand_sae(10, 24, 6).float()
    sae.save(tmp_path / "sae", meta={"model": "tiny"})
    loaded, cfg = TopKSAE.load(tmp_path / "sae")
    assert cfg["model"] == "tiny" and (cfg["d"], cfg["n"], cfg["k"]) == (10, 24, 6)
    for (name, p), q in zip(sae.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(p, q), name
    with pytest.raises(FileNotFoundError, match="no sae"):
        TopKSAE.load(tmp_path)


def test_sae_rejects_bad_width_and_k():
    sae = TopKSAE(8, 16, 4)
    with pytest.raises(ValueError, match="width 8, got 9"):
        sae.encode(torch.randn(2, 9))
    for k in (0, 17, 2.5):
        with pytest.raises(ValueError, match="k must be"):
            TopKSAE(8, 16, k)


def test_sae_training_step_keeps_unit_atoms_and_drops_parallel_grad():
    torch.manual_seed(0)
    sae = TopKSAE(12, 40, 5)
    assert torch.equal(sae.W_enc, sae.W_dec.T)                      # tied at construction too
    h = torch.randn(64, 12)
    sae.init_from_data(h)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    out = sae(h)
    L.fvu(out.x, out.x_hat).backward()
    sae.remove_parallel_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(0)                  # (n,)
    assert parallel.abs().max() < 1e-6 and sae.W_dec.grad.abs().sum() > 0
    torch.optim.Adam(sae.parameters(), lr=1e-2).step()
    sae.normalise_atoms()
    torch.testing.assert_close(sae.W_dec.norm(dim=0), torch.ones(40))


def test_sae_init_from_data_mean_and_median():
    h = torch.randn(50, 6)
    sae = TopKSAE(6, 12, 2)
    sae.init_from_data(h)
    torch.testing.assert_close(sae.b_dec.data, F.normalize(h, dim=-1).mean(0))
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [10.0, 10.0]])
    m = geometric_median(pts, iters=2000, eps=1e-10)
    objective = lambda c: (pts - c).norm(dim=-1).sum()
    for step in torch.eye(2) * 1e-3:
        assert objective(m) <= objective(m + step) and objective(m) <= objective(m - step)


# ---------------------------------------------------------------- evaluation metrics (§4)

def naive_cka(X, Y):
    X, Y = X - X.mean(0), Y - Y.mean(0)
    return np.linalg.norm(Y.T @ X) ** 2 / (np.linalg.norm(X.T @ X) * np.linalg.norm(Y.T @ Y))


def test_cka_matches_naive_and_is_symmetric_with_different_widths():
    X, Y = torch.randn(40, 7), torch.randn(40, 13)
    Y[:, :7] += X
    assert L.linear_cka(X, Y).item() == pytest.approx(naive_cka(*np64(X, Y)), rel=1e-10)
    assert L.linear_cka(X, Y).item() == pytest.approx(L.linear_cka(Y, X).item(), rel=1e-12)


def test_cka_invariant_to_rotation_and_isotropic_scaling():
    X = torch.randn(60, 10, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(10, 10, dtype=torch.float64))
    assert L.linear_cka(X, 3.7 * X @ Q + 2.0).item() == pytest.approx(1.0, abs=1e-10)
    anisotropic = X * torch.linspace(0.1, 5, 10, dtype=torch.float64)
    assert L.linear_cka(X, anisotropic).item() < 0.99


def test_cka_near_zero_for_independent_high_dimensional_data():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(2000, 100, generator=g), torch.randn(2000, 100, generator=g)
    assert L.linear_cka(X, Y).item() < 0.1


def test_fvu_zero_for_perfect_and_one_for_mean():
    x = torch.randn(30, 8, dtype=torch.float64)
    assert L.fvu(x, x.clone()).item() == 0.0
    assert L.fvu(x, x.mean(0).expand_as(x)).item() == pytest.approx(1.0, rel=1e-12)


def test_feature_overlap_entropy_and_dead_match_naive():
    g = torch.Generator().manual_seed(2)
    z0 = torch.rand(6, 9, generator=g) * (torch.rand(6, 9, generator=g) > 0.6)
    z = torch.rand(6, 9, generator=g) * (torch.rand(6, 9, generator=g) > 0.6)
    z[:, 3] = 0.0
    z[:, 8] = 0.0
    k = 4
    zn, z0n = np64(z, z0)
    ref = np.mean([sum(1 for i in range(9) if zn[b, i] > 0 and z0n[b, i] > 0) / k
                   for b in range(6)])
    assert L.feature_overlap(z, z0, k).item() == pytest.approx(ref, rel=1e-12)
    mass = zn.sum(0)
    p = mass / mass.sum()
    H = -sum(pi * math.log(pi) for pi in p if pi > 0)
    got_H, got_norm = L.feature_entropy(z)
    assert got_H.item() == pytest.approx(H, rel=1e-12)
    assert got_norm.item() == pytest.approx(H / math.log(9), rel=1e-12)
    assert L.dead_features(z) == sum(1 for i in range(9) if (zn[:, i] <= 0).all())
    assert L.feature_overlap(z0, z0, int((z0 > 0).sum(-1).max())) > 0


def test_entropy_extremes():
    uniform = torch.ones(4, 16)
    H, Hn = L.feature_entropy(uniform)
    assert Hn.item() == pytest.approx(1.0) and H.item() == pytest.approx(math.log(16))
    one = torch.zeros(4, 16)
    one[:, 5] = 2.0
    assert L.feature_entropy(one)[0].item() == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- the controls: PCA basis, LDIFS
PCA_SIZES = [(1, 5, 1), (3, 10, 10), (4, 12, 5), (7, 33, 8)]     # (B, d, m); m = d: nothing outside


def basis64(P, mean):
    """PCABasis(P, mean) in float64 with P, μ exactly as given (the module stores float32)."""
    basis = PCABasis(P, mean).double()
    with torch.no_grad():
        basis.W_dec.copy_(P)
        basis.mean.copy_(mean)
    return basis


def rand_basis(d, m, seed=0):
    """A float64 PCABasis with random orthonormal P (d, m) and a random mean."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return basis64(Q[:, :m], 0.1 * torch.randn(d, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("B,d,m", PCA_SIZES)
def test_pca_terms_match_naive_projection(B, d, m):
    """--reg pca through the SAE's code path equals, in float64, L_res = mean ((I − P Pᵀ)Δx)²
    with the projector built by NumPy and L_sparse = mean |Pᵀ(x − μ) − Pᵀ(x0 − μ)| in loops."""
    basis = rand_basis(d, m, seed=B)
    g = torch.Generator().manual_seed(d)
    h0 = torch.randn(B, d, generator=g, dtype=torch.float64) * 4
    h = h0 + torch.randn(B, d, generator=g, dtype=torch.float64)
    x, x0 = (v / np.linalg.norm(v, axis=-1, keepdims=True) for v in np64(h, h0))
    P, mu = np64(basis.W_dec, basis.mean)
    outside = (x - x0) @ (np.eye(d) - P @ P.T).T                   # (I − P Pᵀ) Δx, row-wise
    coef = lambda v: [[sum(P[i, j] * (v[b, i] - mu[i]) for i in range(d)) for j in range(m)]
                      for b in range(B)]                            # noqa: E731
    dc = np.array(coef(x)) - np.array(coef(x0))
    t = L.regulariser("pca", h, h0, basis, lam=3.0, mu=0.5, lam_l1=0.2)
    assert t["res"].item() == pytest.approx((outside ** 2).mean(), rel=1e-9, abs=1e-15)
    assert t["sparse"].item() == pytest.approx(np.abs(dc).mean(), rel=1e-9)
    assert t["reg"].item() == pytest.approx(3.0 * (0.5 * t["res"] + 0.2 * t["sparse"]).item(),
                                            rel=1e-12)
    if m == d:                                   # a complete basis expresses every change
        assert t["res"].item() == pytest.approx(0.0, abs=1e-28)
    else:
        assert t["res"].item() > 0


def test_pca_residual_is_the_change_of_its_reconstruction_error():
    """As for the SAE (§5): L_res = mean ((x − x̃) − (x0 − x̃0))², x̃ = decode(encode(x)); μ
    cancels, so it does not depend on the basis's mean."""
    basis = rand_basis(11, 4, seed=3)
    h0, h = torch.randn(6, 11, dtype=torch.float64), torch.randn(6, 11, dtype=torch.float64)
    x, x0 = F.normalize(h, dim=-1), F.normalize(h0, dim=-1)
    err = (x - basis.decode(basis.encode(h))) - (x0 - basis.decode(basis.encode(h0)))
    res = L.regulariser("pca", h, h0, basis)["res"]
    assert res.item() == pytest.approx(err.pow(2).mean().item(), rel=1e-10)
    moved = basis64(basis.W_dec, basis.mean + 5.0)
    assert L.regulariser("pca", h, h0, moved)["res"].item() == pytest.approx(res.item(), rel=1e-10)


def test_pca_and_sae_paths_refuse_the_wrong_dictionary():
    h, h0 = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="needs a PCA basis"):
        L.regulariser("pca", h, h0, rand_sae(8, 16, 2))
    with pytest.raises(ValueError, match="needs a PCA basis"):
        L.regulariser("pca", h, h0)
    with pytest.raises(ValueError, match="needs a trained SAE"):
        L.regulariser("sae-sparse", h, h0, rand_basis(8, 3))


def naive_ldifs(feats, feats0):
    """Loops: per block, per sample and token, unit vectors along channels, squared difference
    averaged over channels, tokens and the batch; then the mean over blocks."""
    blocks = []
    for f, f0 in zip(np64(*feats), np64(*feats0)):
        vals = []
        for b in range(f.shape[0]):
            for t in range(f.shape[1]):
                u = f[b, t] / math.sqrt(sum(v * v for v in f[b, t]))
                u0 = f0[b, t] / math.sqrt(sum(v * v for v in f0[b, t]))
                vals += [(u[c] - u0[c]) ** 2 for c in range(len(u))]
        blocks.append(sum(vals) / len(vals))
    return sum(blocks) / len(blocks)


def block_features(B, shapes, seed, scale=0.3):
    """(feats, feats0): float64 (B, T_l, C_l) per block, feats = feats0 + noise."""
    g = torch.Generator().manual_seed(seed)
    feats0 = [torch.randn(B, T, C, generator=g, dtype=torch.float64) * 3 for T, C in shapes]
    return [f + scale * torch.randn(f.shape, generator=g, dtype=torch.float64)
            for f in feats0], feats0


@pytest.mark.parametrize("B,shapes", [(1, [(1, 5)]), (3, [(7, 13), (2, 4), (1, 9)]),
                                      (2, [(17, 64), (17, 64), (17, 64)])])
def test_ldifs_matches_naive(B, shapes):
    feats, feats0 = block_features(B, shapes, seed=B)
    ref = naive_ldifs(feats, feats0)
    assert L.ldifs(feats, feats0).item() == pytest.approx(ref, rel=1e-10)
    h = torch.randn(B, 6, dtype=torch.float64)
    t = L.regulariser("ldifs", h, h, lam=7.0, feats=feats, feats0=feats0)
    assert set(t) == {"ldifs", "reg"} and t["reg"].item() == pytest.approx(7 * ref, rel=1e-10)


def test_ldifs_zero_for_same_directions_and_refuses_mismatched_blocks():
    feats0 = block_features(4, [(3, 5), (6, 2)], seed=0)[1]
    scaled = [f * torch.rand(f.shape[:-1] + (1,), dtype=torch.float64).add(0.5) for f in feats0]
    assert L.ldifs(scaled, feats0).item() == pytest.approx(0.0, abs=1e-28)  # per-token scale
    opposite = [-f for f in feats0]                                # (2 − 2·(−1)) / C per token
    assert L.ldifs(opposite, feats0).item() == pytest.approx((4 / 5 + 4 / 2) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="same blocks"):
        L.ldifs(feats0[:1], feats0)
    with pytest.raises(ValueError, match="block features"):
        L.regulariser("ldifs", torch.randn(2, 3), torch.randn(2, 3))


def test_ldifs_in_fp32_under_bf16_inputs():
    feats, feats0 = block_features(2, [(5, 8), (3, 16)], seed=1)
    half = L.ldifs([f.bfloat16() for f in feats], [f.bfloat16() for f in feats0])
    assert half.dtype == torch.float32
    ref = L.ldifs([f.bfloat16().double() for f in feats], [f.bfloat16().double() for f in feats0])
    assert half.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["pca", "ldifs"])
def test_controls_gradcheck_and_no_gradient_to_the_frozen_side(name):
    basis = rand_basis(6, 3, seed=1)
    h0 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    h = (h0.detach() + 0.5 * torch.randn(3, 6, dtype=torch.float64)).requires_grad_()
    feats, feats0 = block_features(3, [(4, 5), (2, 7)], seed=2)
    feats = [f.requires_grad_() for f in feats]
    feats0 = [f.requires_grad_() for f in feats0]
    basis.W_dec.requires_grad_()                       # even a basis that asks for gradients
    if name == "pca":
        fn = lambda h: L.regulariser("pca", h, h0, basis, lam=2.0, lam_l1=0.3)["reg"]  # noqa
        assert torch.autograd.gradcheck(fn, (h,))
        fn(h).backward()
        assert h.grad.abs().sum() > 0 and basis.W_dec.grad is None
    else:
        fn = lambda *f: L.ldifs(list(f), feats0)                   # noqa: E731
        assert torch.autograd.gradcheck(fn, tuple(feats))
        L.regulariser("ldifs", h, h0, feats=feats, feats0=feats0)["reg"].backward()
        assert all(f.grad.abs().sum() > 0 for f in feats)
        assert all(f.grad is None for f in feats0)
    assert h0.grad is None


def naive_held_out_fvu(h_train, h_val, m):
    """The held-out FVU of the top-m PCA of h_train by NumPy's SVD (another algorithm than
    fit_pca's eigh): Σ||(I − P Pᵀ)(x − μ)||² / Σ||x − μ||², μ the training mean."""
    xt, xv = (v / np.linalg.norm(v, axis=-1, keepdims=True) for v in np64(h_train, h_val))
    mu = xt.mean(0)
    _, _, Vt = np.linalg.svd(xt - mu, full_matrices=False)
    P = Vt[:m].T
    r = (xv - mu) - (xv - mu) @ P @ P.T
    return (r ** 2).sum() / ((xv - mu) ** 2).sum()


def test_pca_fit_and_held_out_fvu_curve_match_naive():
    g = torch.Generator().manual_seed(5)
    d = 9                                                            # a spread spectrum
    h = torch.randn(300, d, generator=g) * torch.linspace(3, 0.2, d) + 2.0
    h_train, h_val = h[:250], h[250:]
    mean, V, values = fit_pca(h_train)
    assert (values[:-1] >= values[1:]).all()
    curve = pca_fvu_curve(h_val, mean, V)
    assert curve.shape == (d + 1,) and curve[0].item() == pytest.approx(1.0, rel=1e-12)
    assert curve[d].item() == pytest.approx(0.0, abs=1e-12) and (curve[1:] <= curve[:-1]).all()
    for m in (1, 4, d - 1):
        assert curve[m].item() == pytest.approx(naive_held_out_fvu(h_train, h_val, m), rel=1e-8)
        basis = basis64(V[:, :m], mean)                              # the module says the same
        out = basis(h_val.double())
        err = (out.x - out.x_hat).pow(2).sum() / (out.x - mean).pow(2).sum()
        assert err.item() == pytest.approx(curve[m].item(), rel=1e-8)


def test_matched_components_is_the_smallest_m_at_or_below_the_target():
    curve = torch.tensor([1.0, 0.6, 0.35, 0.3, 0.3, 0.1, 0.0], dtype=torch.float64)
    assert matched_components(curve, 0.35) == 2                      # equal counts as matched
    assert matched_components(curve, 0.34) == 3                      # first of a tie
    assert matched_components(curve, 0.2) == 5
    assert matched_components(curve, 0.99) == 1                      # never m = 0
    assert matched_components(curve, -1.0) == 6                      # nothing reaches it: d


def test_pca_basis_save_load_round_trip_and_width_check(tmp_path):
    basis = rand_basis(10, 4).float()
    basis.save(tmp_path / "pca", meta={"model": "tiny"})
    loaded, cfg = PCABasis.load(tmp_path / "pca")
    assert cfg["kind"] == "pca" and (cfg["d"], cfg["m"], cfg["model"]) == (10, 4, "tiny")
    assert (loaded.d, loaded.n) == (10, 4)
    for name, t in basis.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match="no pca"):
        PCABasis.load(tmp_path)
    with pytest.raises(ValueError, match="width 10, got 9"):
        loaded.encode(torch.randn(2, 9))

