"""The loss and metric math of SAE-FT, as short pure functions on tensors.

Every function here is one quantity of the paper (Morelli et al. 2026, "Sparse Autoencoders enable
Robust and Interpretable Fine-tuning of CLIP models"); section numbers (§) are the paper's, and
the README's "paper → code" table maps each one to its function. Shapes: B = batch, d = embedding width,
n = number of SAE latents (dictionary atoms).

    x  = normalise(f_θ(img))    (B, d)   fine-tuned embedding, unit norm
    x0 = normalise(f_0(img))    (B, d)   zero-shot embedding, unit norm, never gets a gradient
    z  = E(x), z0 = E(x0)       (B, n)   Top-k SAE codes (z ≥ 0, at most k non-zeros per row)
    Δx = x − x0,  Δz = z − z0
    c  = Pᵀ(x − μ)              (B, m)   coefficients in a PCA basis P (d, m) (the linear control)
    f_l, f0_l                (B, T_l, C_l)  block l's features of the two towers (LDIFS)

Reductions are means over all elements (as in the authors' code) so their weights carry over.
Nothing here owns parameters: the SAE module (`sae.py`) and the stages call these functions.
"""
import contextlib
import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# Precision: the SAE and the losses in IEEE fp32, in every stage (runs.set_precision: the policy)
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_fp32():
    """IEEE fp32 inside the block (also a decorator), whatever the stage set outside: autocast
    off on every device type where it is on, and TF32 off for cuBLAS matmuls and cuDNN
    convolutions; the caller's settings are restored after. The SAE (encode, Top-k, decode),
    the regulariser and AuxK run in it, so a feature's support is the same in every stage
    (runs.set_precision: the policy). On a CPU only the autocast part changes anything; the
    TF32 switches matter on CUDA alone. Autograd's backward of the block runs later, under the
    stage's own setting."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    with contextlib.ExitStack() as stack:
        for device_type in ("cuda", "cpu", "mps"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved


# --------------------------------------------------------------------------------------------
# Top-k SAE (§3; Gao et al. 2024). The encoder math lives here, not in sae.py, so the
# regulariser below can run it with *detached* SAE parameters: the frozen SAE can then never
# receive a gradient, whatever its requires_grad flags say.
# --------------------------------------------------------------------------------------------


@exact_fp32()
def topk_encode(x, W_enc, b_enc, b_dec, k, normalise=True):
    """z = ReLU(TopK_k(W_enc (x̂ − b_dec) + b_enc)), with x̂ = x / ||x||.

    x (B, d) any scale — normalised here, so the SAE always sees the scale it was trained on;
    W_enc (n, d), b_enc (n,), b_dec (d,). Per-sample TopK (not batch TopK): the code of one
    image never depends on the rest of the batch. Returns (z (B, n), pre (B, n)), where `pre` are
    the pre-activations (AuxK needs them). normalise=False encodes x as given (x̂ = x): only the
    authors'-objective mode of `regulariser` (space="raw") does that.
    """
    if normalise:
        x = F.normalize(x, dim=-1)
    pre = (x - b_dec) @ W_enc.T + b_enc                        # (B, n)
    top = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    return z, pre


def linear_encode(x, P, mean, normalise=True):
    """c = Pᵀ(x̂ − μ), x̂ = x / ||x||: the coefficients of x in a linear basis (the PCA control).

    x (B, d) any scale — normalised here, as topk_encode does; P (d, m) orthonormal columns, mean
    μ (d,). Returns c (B, m). Its decoder is x̃ = P c + μ, so W_dec = P and the basis's
    reconstruction error is (I − P Pᵀ)(x̂ − μ). normalise=False: space="raw" (see `regulariser`).
    """
    if normalise:
        x = F.normalize(x, dim=-1)
    return (x - mean) @ P                                       # (B, m)


def fvu(x, x_hat):
    """Fraction of variance unexplained, Σ||x − x̂||² / Σ||x − mean(x)||²  (x, x_hat: (B, d)).

    0 for a perfect reconstruction, 1 for predicting the batch mean, > 1 when worse than that.
    Used both as the SAE training loss (§3) and as the drift metric of §4.
    """
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


@exact_fp32()
def auxk_reconstruction(pre, dead, W_dec, k_aux):
    """ê = W_dec · ReLU(TopK_{k_aux}(pre restricted to dead latents))  (Gao et al. 2024, AuxK).

    pre (B, n) SAE pre-activations, dead (n,) bool, W_dec (d, n). k_aux is capped at the number
    of dead latents. Returns ê (B, d), or None when no latent is dead.
    """
    n_dead = int(dead.sum())
    if n_dead == 0:
        return None
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(min(k_aux, n_dead), dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))
    return z_aux @ W_dec.T


def auxk_loss(residual, residual_hat):
    """AuxK dead-latent loss (Gao et al. 2024, §A.2): ||e − ê||² / ||e − mean(e)||².

    residual e = x − x̃ (B, d), detached by the caller; residual_hat ê (B, d) = the residual
    reconstructed from the top-k_aux *dead* latents, without b_dec. Returns 0 (not NaN) when
    there is nothing to explain (no dead latents → ê is all zeros and the caller passes None).
    """
    if residual_hat is None:
        return residual.new_zeros(())
    loss = fvu(residual, residual_hat)
    return torch.nan_to_num(loss, nan=0.0, posinf=0.0)


# --------------------------------------------------------------------------------------------
# SAE-FT regularisers (§5) and baselines (§4, §5.1)
# --------------------------------------------------------------------------------------------


def residual_alignment(dx, dz, W_dec):
    """L_res = mean over B·d of (Δx − W_dec Δz)²  (§5, residual alignment).

    dx (B, d), dz (B, n), W_dec (d, n). The part of the representation change the dictionary
    cannot express; 0 exactly when Δx = W_dec Δz.
    """
    return (dx - dz @ W_dec.T).pow(2).mean()


def sparse_feature_change(dz):
    """L_sparse = mean over B·n of |Δz|  (§5, strategy 1). dz (B, n)."""
    return dz.abs().mean()


def feature_preservation(z, z0):
    """L_pres = mean over B·n of 1[z0 = 0] · |z|  (§5, strategy 2, the main method).

    Penalises SAE features that switch on for the fine-tuned model but were off for the
    zero-shot one. z, z0 (B, n); z0 is a constant (mask only).
    """
    off = (z0 == 0).to(z.dtype)
    return (off * z.abs()).mean()


def feature_removal(z, z0):
    """L_remove = mean over B·n of 1[z0 > 0] · ReLU(z0 − z)  (abstract: "addition and removal").

    Penalises zero-shot features that weaken or switch off. z, z0 (B, n).
    """
    on = (z0 > 0).to(z.dtype)
    return (on * F.relu(z0 - z)).mean()


def ldifs(feats, feats0):
    """LDIFS (Mukhoti et al. 2023) = mean over blocks l of mean over B·T_l·C_l of (f̂_l − f̂0_l)²,
    f̂ = f / ||f|| along the channel axis (one unit vector per token or spatial position).

    feats, feats0: lists of (B, T_l, C_l) tensors, block l's features of the trained and the
    frozen tower on the same images (models.tower_features); feats0 is detached. Each block
    weighs the same whatever its width or token count. Computed in fp32 (fp64 stays fp64).
    """
    if len(feats) != len(feats0) or not feats:
        raise ValueError(f"LDIFS needs the same blocks of both towers, got {len(feats)} and "
                         f"{len(feats0)}")
    per_block = [(F.normalize(at_least_fp32(f), dim=-1)
                  - F.normalize(at_least_fp32(f0.detach()), dim=-1)).pow(2).mean()
                 for f, f0 in zip(feats, feats0)]
    return torch.stack(per_block).mean()


def l2_drift(x, x0):
    """mean over B·d of (x − x0)²: L2 between unit embeddings (§4, LDIFS on the last layer)."""
    return (x - x0).pow(2).mean()


def l1_drift(x, x0):
    """mean over B·d of |x − x0| (§5.1 baseline)."""
    return (x - x0).abs().mean()


def at_least_fp32(t):
    """bf16/fp16 → fp32 (the loss math is never done in half precision); fp64 stays fp64."""
    return t if t.dtype == torch.float64 else t.float()


# --------------------------------------------------------------------------------------------
# The fine-tuning objective L = CE(logits, y) + λ·R(h, h0; SAE)  (§3, §5; finetune.sae_ft_loss)
# --------------------------------------------------------------------------------------------


def cross_entropy(logits, y, label_smoothing=0.0):
    """CE = mean over B of −log softmax(logits)_y (with label smoothing ε: the target puts 1 − ε
    on y and ε / C on every class). logits (B, C) — from a bf16 forward too: the loss is
    computed in at least fp32 — and y (B,) class ids."""
    return F.cross_entropy(at_least_fp32(logits), y, label_smoothing=label_smoothing)


REGULARISERS = ("none", "l2", "l1", "sae-sparse", "sae-preserve", "sae-preserve-remove", "pca",
                "ldifs")
# Where R is computed: "unit" (this project's default) on unit-normalised embeddings, "raw" on
# the raw ones, as the authors' training code does (see `regulariser`).
SPACES = ("unit", "raw")

# The regulariser's weights: the one set of defaults (finetune.py's command line reads them
# from here). They are on this project's scale — R sees unit-normalised embeddings — and were
# chosen on the toy world (λ = 10–100 barely changed anything there; λ = 1000, λ_mask = 1 held
# OOD accuracy for both L2 and SAE-FT). Tune λ per model. See `regulariser` for the scale note.
WEIGHTS = {"lam": 1000.0, "mu": 1.0, "lam_mask": 1.0, "lam_l1": 1e-4, "lam_remove": 2e-3}
# The authors' weights (§5), meant for raw CLIP embeddings (||h|| ≈ 10 for ViT-B): the defaults
# of space="raw" (finetune.py --sae-space raw).
AUTHORS_WEIGHTS = {"lam": 70.0, "mu": 1.0, "lam_mask": 10.0, "lam_l1": 1e-3, "lam_remove": 0.02}


@exact_fp32()
def regulariser(name, h, h0, sae=None, lam=WEIGHTS["lam"], mu=WEIGHTS["mu"],
                lam_l1=WEIGHTS["lam_l1"], lam_mask=WEIGHTS["lam_mask"],
                lam_remove=WEIGHTS["lam_remove"], space="unit", feats=None, feats0=None):
    """Every term of the fine-tuning regulariser R by name, plus "reg" = λ·R (add it to CE).

    h (B, d) fine-tuned embedding, h0 (B, d) zero-shot embedding — both raw (any norm). With
    space="unit" (the default) they are unit-normalised here (§3: the SAE and the cosine head
    only see directions). h0 and the SAE parameters are detached: the zero-shot side never
    receives a gradient. `sae` is the frozen TopKSAE for sae-*, the frozen PCABasis (sae.py)
    for pca; feats, feats0 are the towers' block features for ldifs (see `ldifs`).

        none                 R = 0
        l2 / l1              R = l2_drift / l1_drift
        sae-sparse           R = μ·L_res + λ_l1·L_sparse
        sae-preserve         R = μ·L_res + λ_mask·L_pres
        sae-preserve-remove  R = μ·L_res + λ_mask·L_pres + λ_remove·L_remove
        pca                  R = μ·L_res + λ_l1·L_sparse with the PCA basis in the SAE's place:
                             z = c = Pᵀ(x − μ_pca), W_dec = P, so L_res = mean ((I − P Pᵀ)Δx)²
                             (the change outside the top-m principal subspace of the zero-shot
                             embeddings) and L_sparse = mean |Δc| — the same two functions as
                             sae-sparse, a linear control for them (not in the paper; the
                             authors' code has it). λ_l1 = 0 leaves L_res alone, the control
                             of sae-preserve with λ_mask = 0.
        ldifs                R = ldifs(feats, feats0): LDIFS (Mukhoti et al. 2023), the distance
                             of channel-normalised features at every block of the image tower;
                             l2 is its last-layer special case on the embedding (§4).

    Scale note. The authors' code applies the SAE and R to raw embeddings, ||h|| ≈ 10 for CLIP
    ViT-B; here they see unit-norm ones. Squared terms (L_res, l2) are then ≈ ||h||² smaller
    here and |z| terms (L_pres, L_sparse, L_remove) ≈ ||h|| smaller, so the authors' (λ = 70,
    μ = 1, λ_mask = 10, λ_l1 = 1e-3, λ_remove = 0.02) correspond here to λ ≈ 70·||h||²,
    λ_mask ≈ 10/||h||, λ_l1 ≈ 1e-3/||h||, λ_remove ≈ 0.02/||h|| (finetune.py prints these for
    the model's own ||h||). The defaults are WEIGHTS above. The conversion is only approximate:
    the SAE's top-k choice itself depends on the scale of its input.

    space="raw" is the authors' objective (their training code, reg types mse / l1 / sae /
    sae_mask / sae_add_remove with its default normalize=False): x = h, x0 = h0 as they are,
    z = ReLU(TopK_k(W_enc (h − b_dec) + b_enc)) with no normalisation, every term and weight
    unchanged — so AUTHORS_WEIGHTS mean what they meant. The SAE is still ours (b_enc, ReLU);
    theirs has neither, so the two coincide when b_enc = 0 and the k largest pre-activations are
    positive. On unit-norm h, h0 the two spaces agree. pca in raw space encodes h as it is
    (μ_pca cancels in Δc, so L_res is the raw change outside the subspace); ldifs normalises
    every block's features itself and ignores `space`.

    LDIFS's scale: per token, the mean over C channels of (f̂ − f̂0)² is (2 − 2 cos)/C, as l2 is
    (2 − 2 cos)/d on the embedding, so on a tower whose width C is near d the two take λ of the
    same order. The authors' ldifs reduces the same way (means over channels, tokens, points and
    the batch) but at five points of ViT-B instead of every block.
    """
    if name not in REGULARISERS:
        raise ValueError(f"unknown regulariser {name!r}; choose one of {', '.join(REGULARISERS)}")
    if space not in SPACES:
        raise ValueError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
    unit = space == "unit"
    x, x0 = at_least_fp32(h), at_least_fp32(h0.detach())
    if unit:
        x, x0 = F.normalize(x, dim=-1), F.normalize(x0, dim=-1)
    terms = {}
    if name == "none":
        terms["reg"] = x.new_zeros(())
        return terms
    if name in ("l2", "l1"):
        terms[name] = (l2_drift if name == "l2" else l1_drift)(x, x0)
        terms["reg"] = lam * terms[name]
        return terms
    if name == "ldifs":
        if feats is None or feats0 is None:
            raise ValueError("regulariser 'ldifs' needs both towers' block features (pass "
                             "feats=..., feats0=...; models.tower_features)")
        terms["ldifs"] = ldifs(feats, feats0)
        terms["reg"] = lam * terms["ldifs"]
        return terms
    z, z0, W_dec = codes(name, x, x0, sae, unit)                # (B, n), (B, n), (d, n)
    terms["res"] = residual_alignment(x - x0, z - z0, W_dec)
    total = mu * terms["res"]
    if name in ("sae-sparse", "pca"):
        terms["sparse"] = sparse_feature_change(z - z0)
        total = total + lam_l1 * terms["sparse"]
    else:
        terms["pres"] = feature_preservation(z, z0)
        total = total + lam_mask * terms["pres"]
        if name == "sae-preserve-remove":
            terms["remove"] = feature_removal(z, z0)
            total = total + lam_remove * terms["remove"]
    terms["reg"] = lam * total
    return terms


def codes(name, x, x0, basis, normalise):
    """(z, z0, W_dec) of regulariser `name`: the frozen dictionary's codes of x (with its
    gradient) and of x0 (constant), and its decoder (d, n). sae-*: Top-k SAE codes; pca: the
    coefficients c = Pᵀ(x − μ) of the PCA basis, W_dec = P. The parameters are detached here,
    so the frozen side never receives a gradient whatever its requires_grad flags say."""
    linear = name == "pca"
    if basis is None or linear != hasattr(basis, "mean"):
        need = "a PCA basis (sae.PCABasis)" if linear else "a trained SAE"
        raise ValueError(f"regulariser {name!r} needs {need} (pass sae=...)")
    if linear:
        P, mean = (p.detach().to(x.dtype) for p in (basis.W_dec, basis.mean))
        z = linear_encode(x, P, mean, normalise)                 # (B, m), carries the gradient
        with torch.no_grad():
            z0 = linear_encode(x0, P, mean, normalise)           # (B, m), constant
        return z, z0, P
    W_enc, b_enc, b_dec, W_dec = (p.detach().to(x.dtype) for p in
                                  (basis.W_enc, basis.b_enc, basis.b_dec, basis.W_dec))
    z, _ = topk_encode(x, W_enc, b_enc, b_dec, basis.k, normalise)   # (B, n), with gradient
    with torch.no_grad():
        z0, _ = topk_encode(x0, W_enc, b_enc, b_dec, basis.k, normalise)  # (B, n), constant
    return z, z0, W_dec


# --------------------------------------------------------------------------------------------
# Evaluation metrics (§4): representation drift against the zero-shot model
# --------------------------------------------------------------------------------------------


def linear_cka(X, Y):
    """Linear CKA (Kornblith et al. 2019) = ||Yᵀ X||_F² / (||Xᵀ X||_F · ||Yᵀ Y||_F).

    X (N, d1), Y (N, d2): the same N inputs through two models; widths may differ. Columns are
    centred here. Computed in float64. Invariant to rotations and isotropic scaling of either.
    """
    X = X.double() - X.double().mean(0)
    Y = Y.double() - Y.double().mean(0)
    cross = (Y.T @ X).pow(2).sum()
    return cross / ((X.T @ X).norm() * (Y.T @ Y).norm())


def feature_overlap(z, z0, k):
    """Feature preservation metric: mean over samples of |S0 ∩ S| / k, S = {i : z_i > 0}.

    z, z0 (N, n) SAE codes of the fine-tuned and zero-shot embeddings of the same images.
    1 when every image keeps its zero-shot active set.
    """
    shared = ((z > 0) & (z0 > 0)).sum(-1).double()
    return (shared / k).mean()


def feature_entropy(z):
    """H = −Σ p_i log p_i, p_i = feature i's share of the total activation mass over the set.

    z (N, n) ≥ 0. Returns (H, H / log n); the normalised value is 1 when mass is spread evenly
    over all n features and 0 when a single feature carries it all.
    """
    mass = z.double().clamp_min(0).sum(0)
    p = mass / mass.sum()
    H = -(p[p > 0] * p[p > 0].log()).sum()
    return H, H / math.log(z.shape[-1])


def macro_f1(pred, y):
    """Macro-F1 over the classes present in y: mean over c ∈ unique(y) of
    F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)  (iWildCam's WILDS metric, which passes
    labels = unique(y_true) to scikit-learn's f1_score). pred, y (N,) integer class ids; a class
    that is only predicted adds false positives to no averaged class but costs its images' own
    classes a false negative each."""
    classes = y.unique()
    hit, true = pred[:, None] == classes, y[:, None] == classes         # (N, C) each
    tp = (hit & true).sum(0).double()
    fp = (hit & ~true).sum(0).double()
    fn = (~hit & true).sum(0).double()
    return (2 * tp / (2 * tp + fp + fn)).mean().item()


def accuracy_by_group(pred, y, groups):
    """{group id: (accuracy, count)} over the groups present (FMoW: regions).
    pred, y, groups (N,) integers."""
    correct = (pred == y).double()
    return {int(g): (correct[groups == g].mean().item(), int((groups == g).sum()))
            for g in groups.unique()}


def dead_features(z):
    """Number of SAE features never active (z_i > 0) on any of the N samples. z (N, n)."""
    return int(((z > 0).sum(0) == 0).sum())
