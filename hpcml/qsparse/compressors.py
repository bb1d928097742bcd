"""Compression operators of Qsparse-local-SGD (Basu, Data, Karakus, Diggavi, arXiv 1906.02367).

A compressor is a sparsifier S (dense, Top-k, Rand-k) followed by a quantizer Q (raw floats,
QSGD s-level stochastic quantization, sign with l1 scaling), i.e. the paper's ``Q(S(x))``.
``encode`` turns a vector into a :class:`Payload` (packed bytes + its exact size in bits) and
``decode`` turns those bytes back into a dense vector. Pure torch/numpy, no MPI.

Exact bit counts for a vector of ``d`` float32 coordinates (``ib = ceil(log2 d)``,
``lb = ceil(log2(s + 1))``; float64 vectors use 64-bit floats instead of 32):

========================  ===========================================================
identity                  ``32 d``
top-k / rand-k            ``k (ib + 32)``  (indices + raw values)
qsgd                      ``32 + d (1 + lb)``  (norm + sign bit + level per coordinate)
sign                      ``32 + d``  (l1 scale + one sign bit per coordinate)
qtopk / qrandk            ``k ib + 32 + k (1 + lb)``
signtopk / signrandk      ``k ib + 32 + k``
========================  ===========================================================

No header: ``d``, ``k`` and ``s`` are known to sender and receiver. Wire order: the float
fields (values, norm or scale) first, byte-aligned, then sign and level bits, then indices;
the message is ``ceil(bits / 8)`` bytes.

Guarantees, with the paper's definitions (Section 2):

- Top-k and Rand-k (unscaled) are compression operators (Definition 3) with ``gamma = k/d``:
  ``E||x - S(x)||^2 <= (1 - k/d) ||x||^2``; ``E[Rand_k(x)] = (k/d) x``.
- QSGD ``Q_s`` (Alistarh et al. 2017) is unbiased, ``E[Q_s(v)] = v``, with
  ``E||Q_s(v)||^2 <= (1 + beta_{n,s}) ||v||^2``, ``beta_{n,s} = min(n/s^2, sqrt(n)/s)``.
- Lemma 1: ``Q_s(S_k(x)) / (1 + beta_{k,s})`` is a compression operator with
  ``gamma = k / (d (1 + beta_{k,s}))``. ``contractive=True`` (the default) applies that scaling
  at decode time; ``contractive=False`` gives the unbiased, unscaled quantizer.
- Lemma 2 (sign): ``||S(x)||_1 sign(S(x)) / k`` is a compression operator with
  ``gamma >= 1/d`` (it needs no extra scaling). Zero coordinates are sent as ``+``; the error
  ``||v||^2 - ||v||_1^2 / n`` is the same either way.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from hpcml.qsparse.bitpack import field_floats, float_field, index_bits, pack, unpack

NAMES = ("identity", "topk", "randk", "qsgd", "sign", "qtopk", "qrandk", "signtopk",
         "signrandk")


@dataclasses.dataclass(frozen=True)
class Payload:
    """An encoded vector: ``data`` (uint8, ``ceil(bits / 8)`` bytes) and its exact ``bits``."""

    data: np.ndarray
    bits: int


def qsgd_beta(n: int, s: int) -> float:
    """QSGD's variance factor ``beta_{n,s} = min(n/s^2, sqrt(n)/s)`` for ``n`` coordinates."""
    return min(n / s**2, math.sqrt(n) / s)


# -- sparsifiers: which coordinates are sent -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sparsifier:
    """``kind`` in ``dense``, ``topk``, ``randk``; ``k`` coordinates kept (ignored if dense)."""

    kind: str = "dense"
    k: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "topk", "randk"):
            raise ValueError(f"sparsifier: unknown kind {self.kind!r}")
        if self.kind != "dense" and self.k < 1:
            raise ValueError(f"{self.kind}: k must be >= 1, got {self.k}")

    def kept(self, d: int) -> int:
        """How many coordinates of a ``d``-vector are sent; ``ValueError`` if ``k > d``."""
        if self.kind == "dense":
            return d
        if self.k > d:
            raise ValueError(f"{self.kind}: k = {self.k} exceeds the dimension d = {d} "
                             f"(use k <= {d})")
        return self.k

    def select(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor | None:
        """Indices of the kept coordinates of the 1-D ``x`` (None when dense)."""
        k = self.kept(x.numel())
        if self.kind == "dense":
            return None
        if self.kind == "topk":
            return torch.topk(x.abs(), k, sorted=False).indices
        return torch.randperm(x.numel(), generator=gen)[:k]

    def index_layout(self, d: int) -> list[tuple[int, int]]:
        return [] if self.kind == "dense" else [(self.kept(d), index_bits(d))]


# -- quantizers: how the kept values are written -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class Quantizer:
    """``kind`` in ``raw`` (IEEE floats), ``qsgd`` (``s`` levels), ``sign`` (l1-scaled signs)."""

    kind: str = "raw"
    s: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("raw", "qsgd", "sign"):
            raise ValueError(f"quantizer: unknown kind {self.kind!r}")
        if self.kind == "qsgd" and self.s < 1:
            raise ValueError(f"qsgd: s must be >= 1 quantization level, got {self.s}")

    @property
    def level_bits(self) -> int:
        return (self.s).bit_length()  # ceil(log2(s + 1)): levels 0..s

    def layout(self, n: int, fbits: int) -> list[tuple[int, int]]:
        if self.kind == "raw":
            return [(n, fbits)]
        if self.kind == "sign":
            return [(1, fbits), (n, 1)]
        return [(1, fbits), (n, 1), (n, self.level_bits)]

    def encode(self, v: np.ndarray, gen: torch.Generator | None) -> list[tuple[np.ndarray, int]]:
        if self.kind == "raw":
            return [float_field(v)]
        negative = (v < 0).astype(np.uint64)
        if self.kind == "sign":
            scale = np.abs(v).sum() / max(v.size, 1)
            return [float_field(np.array([scale], dtype=v.dtype)), (negative, 1)]
        norm = np.linalg.norm(v)
        ratio = self.s * np.abs(v) / norm if norm > 0 else np.zeros_like(v)
        low = np.floor(ratio)
        u = torch.rand(v.size, generator=gen, dtype=torch.float64).numpy()
        levels = np.minimum(low + (u < ratio - low), self.s).astype(np.uint64)
        return [float_field(np.array([norm], dtype=v.dtype)), (negative, 1),
                (levels, self.level_bits)]

    def decode(self, words: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
        if self.kind == "raw":
            return field_floats(words[0], dtype)
        sign = 1.0 - 2.0 * words[1].astype(dtype)
        scale = field_floats(words[0], dtype)[0]
        if self.kind == "sign":
            return scale * sign
        return (scale / self.s) * sign * words[2].astype(dtype)

    def beta(self, n: int) -> float:
        """Variance factor of an unbiased quantizer (0 for raw; sign is not unbiased)."""
        return qsgd_beta(n, self.s) if self.kind == "qsgd" else 0.0


@dataclasses.dataclass(frozen=True)
class Compressor:
    """``Q(S(x))`` with exact bit accounting; see the module docstring for the guarantees."""

    sparsifier: Sparsifier = Sparsifier()
    quantizer: Quantizer = Quantizer()
    contractive: bool = True

    @property
    def name(self) -> str:
        s, q = self.sparsifier.kind, self.quantizer.kind
        base = {"dense": "", "topk": "topk", "randk": "randk"}[s]
        prefix = {"raw": "", "qsgd": "q", "sign": "sign"}[q]
        if not base:
            return {"raw": "identity", "qsgd": "qsgd", "sign": "sign"}[q]
        return prefix + base

    def _layout(self, d: int, dtype: torch.dtype) -> list[tuple[int, int]]:
        fbits = torch.finfo(dtype).bits
        # raw floats first (byte-aligned: copied, not bit-packed), indices last
        return self.quantizer.layout(self.sparsifier.kept(d), fbits) + \
            self.sparsifier.index_layout(d)

    def bits(self, d: int, dtype: torch.dtype = torch.float32) -> int:
        """Exact payload size in bits for a ``d``-vector of ``dtype`` (same for every input)."""
        return sum(n * w for n, w in self._layout(d, dtype))

    def scale(self, d: int) -> float:
        """Lemma 1's factor ``1 / (1 + beta_{k,s})`` applied at decode (1 when not needed)."""
        if not self.contractive:
            return 1.0
        return 1.0 / (1.0 + self.quantizer.beta(self.sparsifier.kept(d)))

    def gamma(self, d: int) -> float:
        """The paper's guaranteed contraction: ``E||x - C(x)||^2 <= (1 - gamma) ||x||^2``.
        Only meaningful when ``contractive`` (an unscaled QSGD may expand)."""
        if self.quantizer.kind == "sign":
            return 1.0 / d
        return self.sparsifier.kept(d) / d * self.scale(d)

    def encode(self, x: torch.Tensor, gen: torch.Generator | None = None) -> Payload:
        """Compress the 1-D float32/float64 tensor ``x``; ``gen`` drives Rand-k and QSGD."""
        if x.dim() != 1 or x.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"{self.name}: expected a 1-D float32/float64 tensor, got "
                             f"shape {tuple(x.shape)} {x.dtype}")
        x = x.detach().cpu()
        idx = self.sparsifier.select(x, gen)
        values = (x if idx is None else x[idx]).numpy()
        fields = self.quantizer.encode(values, gen)
        if idx is not None:
            fields.append((idx.numpy().astype(np.uint64), index_bits(x.numel())))
        data, bits = pack(fields)
        return Payload(data, bits)

    def decode(self, data: np.ndarray, d: int, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
        """The dense ``d``-vector that ``data`` (from :meth:`encode`) stands for."""
        words = unpack(data, self._layout(d, dtype))
        np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        has_idx = self.sparsifier.kind != "dense"
        values = self.quantizer.decode(words[:-1] if has_idx else words, np_dtype)
        values = torch.from_numpy(np.ascontiguousarray(values)) * self.scale(d)
        if not has_idx:
            return values.to(dtype)
        out = torch.zeros(d, dtype=dtype)
        out[torch.from_numpy(words[-1].astype(np.int64))] = values.to(dtype)
        return out

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        """``decode(encode(x))``: the compressed vector as the receiver sees it."""
        return self.decode(self.encode(x, gen).data, x.numel(), x.dtype)


def make_compressor(name: str, k: int = 0, s: int = 1, contractive: bool = True) -> Compressor:
    """Build a compressor by name (one of :data:`NAMES`); ``ValueError`` on a bad name/k/s."""
    if name not in NAMES:
        raise ValueError(f"compressor: unknown name {name!r}; choose one of {', '.join(NAMES)}")
    sparse = next((kind for kind in ("topk", "randk") if name.endswith(kind)), "dense")
    quant = "qsgd" if name in ("qsgd", "qtopk", "qrandk") else (
        "sign" if name.startswith("sign") else "raw")
    return Compressor(Sparsifier(sparse, k), Quantizer(quant, s), contractive)
