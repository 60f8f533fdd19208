"""The Top-k sparse autoencoder (§3; Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

    z  = ReLU(TopK_k(W_enc (x̂ − b_dec) + b_enc)),   x̂ = x / ||x||     (encode)
    x̃ = W_dec z + b_dec                                                (decode)

Beside it, its linear control (not in the paper; the authors' code has one): `PCABasis`, the
top m principal directions P (d, m) of the same unit-normalised embeddings and their mean μ, with
the SAE's interface (encode c = Pᵀ(x̂ − μ), decode x̃ = P c + μ, W_dec = P), so the regulariser runs
the same residual-alignment and sparse-change terms through it (losses.regulariser, --reg pca).

It lives in its own small module (not in train_sae.py) because all three stages need it:
stage 1 trains it, stage 2 regularises through it frozen, stage 3 measures drift with it — and
importing a stage script from another would drag its command line and data code along.
The math itself is in `losses.topk_encode`, shared with the fine-tuning regulariser.
"""
import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from runs import atomic_write, load_json, load_safetensors, reading  # guarded, atomic files
from losses import at_least_fp32, exact_fp32, linear_encode, topk_encode

WEIGHTS, CONFIG = "sae.safetensors", "sae_config.json"
PCA_WEIGHTS, PCA_CONFIG = "pca.safetensors", "pca_config.json"


class SAEOutput(NamedTuple):
    x: torch.Tensor      # (B, d) the unit-normalised input
    z: torch.Tensor      # (B, n) sparse code, ≥ 0, at most k non-zeros per row
    x_hat: torch.Tensor  # (B, d) reconstruction of x
    pre: torch.Tensor    # (B, n) pre-activations (for AuxK)


class TopKSAE(nn.Module):
    """Top-k SAE on unit-normalised d-dim embeddings with n latents; atoms (columns of W_dec)
    are kept at unit norm during training (`remove_parallel_grad` + `normalise_atoms`)."""

    def __init__(self, d, n, k):
        super().__init__()
        if not (isinstance(k, int) and 1 <= k <= n):
            raise ValueError(f"k must be an integer in 1..n={n}, got {k!r}")
        self.d, self.n, self.k = d, n, k
        W_dec = F.normalize(torch.randn(d, n), dim=0)              # (d, n), unit columns
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())                 # (n, d), tied at init only
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))

    def _check_width(self, h):
        if h.shape[-1] != self.d:
            raise ValueError(f"SAE expects embeddings of width {self.d}, got {h.shape[-1]}: "
                             "train the SAE on this model's embeddings (train_sae.py)")

    def encode(self, h):
        """h (B, d), any scale → z (B, n)."""
        self._check_width(h)
        return topk_encode(at_least_fp32(h), self.W_enc, self.b_enc, self.b_dec, self.k)[0]

    @exact_fp32()                 # as encode (topk_encode): IEEE fp32 in every stage
    def decode(self, z):
        """z (B, n) → x̃ (B, d), in the unit-norm space the SAE was trained in."""
        return z @ self.W_dec.T + self.b_dec

    @exact_fp32()
    def forward(self, h):
        self._check_width(h)
        x = F.normalize(at_least_fp32(h), dim=-1)
        z, pre = topk_encode(x, self.W_enc, self.b_enc, self.b_dec, self.k)
        return SAEOutput(x, z, self.decode(z), pre)

    @torch.no_grad()
    def init_from_data(self, h, method="mean"):
        """b_dec ← mean (or geometric median) of the normalised data; W_enc ← W_decᵀ."""
        x = F.normalize(at_least_fp32(h), dim=-1)
        self.b_dec.copy_(x.mean(0) if method == "mean" else geometric_median(x))
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def remove_parallel_grad(self):
        """Drop from each atom's gradient its component along the atom (call after backward):
        the step then moves atoms only tangentially to the unit sphere (Gao et al. 2024)."""
        if self.W_dec.grad is not None:
            g, W = self.W_dec.grad, self.W_dec                      # (d, n) each
            g -= W * (g * W).sum(0, keepdim=True)

    @torch.no_grad()
    def normalise_atoms(self):
        """Renormalise every atom (column of W_dec) to unit norm (call after the step)."""
        self.W_dec.copy_(F.normalize(self.W_dec, dim=0))

    def save(self, out_dir, meta=None):
        """Write <out_dir>/sae.safetensors + sae_config.json, each atomically."""
        save_folder(self, out_dir, (WEIGHTS, CONFIG),
                    {"d": self.d, "n": self.n, "k": self.k, **(meta or {})})

    @classmethod
    def load(cls, sae_dir, device="cpu"):
        """Rebuild an SAE from its folder alone → (sae, config)."""
        sae_dir = require_files(sae_dir, (WEIGHTS, CONFIG), "train_sae.py")
        fix = "pass the folder train_sae.py wrote, or train the SAE again"
        config = load_json(sae_dir / CONFIG, "an SAE config (JSON with d, n, k)", fix)
        with reading(sae_dir / CONFIG, "an SAE config (JSON with d, n, k)", fix):
            sae = cls(config["d"], config["n"], config["k"])
        weights = load_safetensors(sae_dir / WEIGHTS, "SAE weights (safetensors)", fix)
        with reading(sae_dir / WEIGHTS, f"the weights of a d={sae.d}, n={sae.n} SAE", fix):
            sae.load_state_dict(weights)
        return sae.to(device), config


class PCABasis(nn.Module):
    """The top m principal directions of unit-normalised d-dim embeddings, frozen:

        c  = Pᵀ(x̂ − μ),  x̂ = x / ||x||      (encode: m coefficients, dense, signed)
        x̃ = P c + μ                         (decode; reconstruction error (I − P Pᵀ)(x̂ − μ))

    P (d, m) has orthonormal columns (the eigenvectors of the data's covariance with the m
    largest eigenvalues), μ (d,) the data mean. `W_dec` is P and `n` is m, as on TopKSAE, so
    the regulariser and the reports treat the two alike. Fitted by `fit_pca` (train_sae.py
    --basis pca); saved as pca.safetensors + pca_config.json, loadable alone."""

    def __init__(self, P, mean):
        super().__init__()
        self.d, self.n = P.shape
        self.register_buffer("W_dec", P.float().contiguous())      # (d, m) = P
        self.register_buffer("mean", mean.float().contiguous())    # (d,) = μ

    def encode(self, h):
        """h (B, d), any scale → c (B, m)."""
        if h.shape[-1] != self.d:
            raise ValueError(f"the PCA basis expects embeddings of width {self.d}, got "
                             f"{h.shape[-1]}: fit it on this model's embeddings (train_sae.py "
                             "--basis pca)")
        return linear_encode(at_least_fp32(h), self.W_dec, self.mean)

    def decode(self, c):
        """c (B, m) → x̃ (B, d), in the unit-norm space the basis was fitted in."""
        return c @ self.W_dec.T + self.mean

    def forward(self, h):
        c = self.encode(h)
        return SAEOutput(F.normalize(at_least_fp32(h), dim=-1), c, self.decode(c), c)

    def save(self, out_dir, meta=None):
        """Write <out_dir>/pca.safetensors + pca_config.json, each atomically."""
        save_folder(self, out_dir, (PCA_WEIGHTS, PCA_CONFIG),
                    {"kind": "pca", "d": self.d, "m": self.n, **(meta or {})})

    @classmethod
    def load(cls, basis_dir, device="cpu"):
        """Rebuild a PCA basis from its folder alone → (basis, config)."""
        basis_dir = require_files(basis_dir, (PCA_WEIGHTS, PCA_CONFIG),
                                  "train_sae.py --basis pca")
        fix = "pass the folder train_sae.py --basis pca wrote, or fit the basis again"
        config = load_json(basis_dir / PCA_CONFIG, "a PCA basis config (JSON with d, m)", fix)
        weights = load_safetensors(basis_dir / PCA_WEIGHTS, "PCA basis (safetensors)", fix)
        with reading(basis_dir / PCA_WEIGHTS, "a PCA basis (W_dec (d, m), mean (d,))", fix):
            basis = cls(weights["W_dec"], weights["mean"])
            if (basis.d, basis.n) != (config["d"], config["m"]):
                raise ValueError(f"its shape {(basis.d, basis.n)} is not the config's "
                                 f"{(config['d'], config['m'])}")
        return basis.to(device), config


def fit_pca(h):
    """Principal directions of the unit-normalised embeddings h (N, d), in float64:
    (μ (d,), V (d, d) eigenvectors of the covariance as columns, eigenvalues (d,)), sorted by
    decreasing eigenvalue. The top-m basis is PCABasis(V[:, :m], μ)."""
    x = F.normalize(h.double(), dim=-1)
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / len(x)                       # (d, d)
    values, vectors = torch.linalg.eigh(cov)                       # ascending
    order = values.argsort(descending=True)
    return mean, vectors[:, order], values[order]


def pca_fvu_curve(h, mean, V):
    """Held-out FVU of the top-m basis for every m = 0 … d: (d + 1,) float64,

        FVU(m) = Σ_i ||(I − P_m P_mᵀ)(x_i − μ)||² / Σ_i ||x_i − μ||²,   x = h / ||h||,

    P_m = V[:, :m], μ the *training* mean (as train_sae.held_out_report scores the SAE). V is
    a complete orthonormal basis, so the residual of m components is the energy of the rest."""
    x = F.normalize(h.double(), dim=-1) - mean.double()
    energy = (x @ V.double()).pow(2).sum(0)                        # (d,) per direction
    total = x.pow(2).sum()
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])      # (d + 1,)
    return ((total - kept) / total).clamp_min(0)


def matched_components(curve, target):
    """The smallest m ≥ 1 whose held-out FVU is at most `target` (the SAE's held-out FVU on the
    same split): min {m ∈ 1 … d : curve[m] ≤ target}; d when none is (then FVU(d) ≈ 0 only
    misses by rounding). curve: pca_fvu_curve's (d + 1,) values."""
    hits = (curve[1:] <= target).nonzero()
    return int(hits[0]) + 1 if len(hits) else len(curve) - 1


def geometric_median(x, iters=100, eps=1e-6):
    """Weiszfeld's algorithm: the point minimising Σ_i ||x_i − m||. x (N, d) → (d,)."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=-1).clamp_min(eps)               # (N,)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < eps:
            return m_new
        m = m_new
    return m


def require_files(folder, names, writer):
    """Path(folder), after checking it holds every file in `names` (else FileNotFoundError
    naming the missing one and the command that writes the folder)."""
    folder = Path(folder)
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"no {name} in {folder}: pass the folder {writer} wrote "
                                    "(its --out)")
    return folder


def save_folder(module, out_dir, names, config):
    """Write a frozen module's weights (safetensors) and its config (JSON) into out_dir under
    names = (weights file, config file), each atomically: a crash leaves the old file or none."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    atomic_write(out_dir / names[0], lambda p: save_file(tensors, p))
    atomic_write(out_dir / names[1], lambda p: Path(p).write_text(json.dumps(config, indent=2)))
