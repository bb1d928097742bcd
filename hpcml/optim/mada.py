"""MADA, the meta-adaptive optimizer of Ozkara et al., "MADA: Meta-Adaptive Optimizers through
hyper-gradient Descent" (ICML 2024, arXiv 2401.08893), as a ``torch.optim.Optimizer``.

The update is the paper's parameterized optimizer (the interpolation of Adam, AMSGrad/AVGrad,
Yogi, Adan and Lion) as implemented in the authors' reference code
(``amazon-science/mada_optimizer_search``, ``gdtuo.py``, ``Meta.step``, commit 2beded8), which
is what was checked here line by line; the paper's own equation numbers could not be read from
the text available to this project, so none are quoted. Per element, step t >= 1, with g the
gradient and d = g - g_prev (d = 0 at the first step, Adan's convention):

    m̄_t = β1 m̄ + (1 - β1) g                    first moment (Adam)
    n_t = β3 n + (1 - β3) d                     gradient-difference moment (Adan)
    ĝ   = g + β3 d,   q = ĝ²
    g̃²  = c q + (1 - c) (ṽ + q sign(q - ṽ))     c = 0: Yogi's additive second moment
    ṽ_t = β2 ṽ + (1 - β2) g̃²
    v̄_t = max(v̄, ṽ_t)  (``vmax="max"``, AMSGrad)  or  v̄ + (ṽ_t - v̄) / t  (``"avg"``, AVGrad)
    v_t = ρ ṽ_t + (1 - ρ) v̄_t
    m̂ = m̄_t / (1 - β1^t) + β3 n_t,   v̂ = v_t / (1 - β2^t)
    x  ← x - η [γ m̂ / (√v̂ + ε) + (1 - γ) sign(λ1 m_L + (1 - λ1) g)]   (γ < 1: Lion's step,
                                                m_L ← λ2 m_L + (1 - λ2) g, (λ1, λ2) = lion_betas)

(β3, c, ρ, γ) = (0, 1, 1, 1) is Adam with its bias correction (``torch.optim.Adam`` step for step);
ρ = 0 with ``vmax="max"`` is ``torch.optim.Adam(amsgrad=True)``; ρ = 0 with ``"avg"`` is AVGrad
(:class:`~hpcml.optim.avgrad.AVGrad`: the running maximum replaced by the running average, which
has a useful hyper-gradient). Decoupled weight decay (AdamW) multiplies x by
``1 - η weight_decay`` first. Where this differs from the reference code: d = 0 and n = 0 at the
first step (the code starts from g_prev = 0 and n = g²), Lion's sign uses the momentum before
its update (as in the Lion paper), and the derivative through v̄ is kept (the code detaches it).

Hyper-gradient descent (the paper's meta-optimization loop; one step of look-back as in
"Gradient descent: the ultimate optimizer", which the authors' code builds on, with plain SGD on
each coefficient and the authors' hyper learning rates and clipping, ``train_ddp.py``). Every
coefficient z with ``hyper_lr[z] > 0``
is learned: x_{t+1} = x_t - η u_t(z) depends on z elementwise, with the state of step t-1 held
fixed, so the hyper-gradient of the next loss is

    ∂L(x_{t+1}) / ∂z = Σ_params <g_{t+1}, ∂x_{t+1}/∂z>,   ∂x_{t+1}/∂z = -η ∂u_t/∂z  (closed form)

Step t stores ∂x_{t+1}/∂z per parameter (``state["d_<z>"]``); step t+1 first takes the dot
products with the new gradients (:meth:`MADA.hypergradient`), optionally reduces them
(``hypergrad_reduce``, e.g. an average over data-parallel ranks), clips each to
``±hyper_clip`` (the authors clip at 10), descends ``z ← z - hyper_lr[z] ∂L/∂z`` and projects z
onto its range (:data:`RANGES`), then updates the parameters with the new coefficients. No
second autograd graph of the model is built.

Cost against ``torch.optim.Adam`` (2 state tensors the size of each parameter): the state holds
m̄, ṽ, plus v̄ (when ρ < 1 or ρ is learned), n and g_prev (when β3 > 0 or β3 is learned), m_L
(when γ < 1 or γ is learned) and one tensor d_<z> per learned coefficient: with all six learned,
12 parameter-sized tensors (6x Adam's optimizer state), kept as one flat buffer per key (the
per-parameter entries are views), plus transient work tensors of the same size during ``step``.
Time: a fixed number of elementwise operations on those buffers (about 40 for the update, 3-12
per learned coefficient) and one dot product per learned coefficient, whatever the number of
parameters; the model's forward/backward is untouched (measured in ``hpcml bench optimizers``:
``optimizer.step()`` about 4x Adam's CPU time on its 116 k-parameter LM).

Coefficients live in each param group (one set per group; the paper uses one group), so
``state_dict``/``load_state_dict`` carry them together with the stored derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

COEFFICIENTS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")

#: Where each coefficient may move when learned (the authors' clamps, widened for β2 so that
#: torch's default 0.999 is inside); it is projected back after every hyper-step.
RANGES: dict[str, tuple[float, float]] = {
    "beta1": (0.0, 0.99), "beta2": (0.5, 0.999), "beta3": (0.0, 0.99),
    "c": (0.0, 1.0), "rho": (0.0, 1.0), "gamma": (0.0, 1.0)}

#: The authors' hyper learning rates for GPT-2 (``train_ddp.py``: SGD per coefficient).
DEFAULT_HYPER_LR: dict[str, float] = {
    "beta1": 5e-4, "beta2": 5e-4, "beta3": 0.1, "c": 0.1, "rho": 0.1, "gamma": 0.1}

VMAX_MODES = ("avg", "max")
SCALARS = ("step", "v_bar_steps")


def _hyper_lrs(hyper_lr: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(hyper_lr, Mapping):
        unknown = set(hyper_lr) - set(COEFFICIENTS)
        if unknown:
            raise ValueError(f"MADA: hyper_lr has unknown coefficients {sorted(unknown)}; "
                             f"known: {', '.join(COEFFICIENTS)}")
        lrs = {k: float(hyper_lr.get(k, 0.0)) for k in COEFFICIENTS}
    else:
        lrs = dict.fromkeys(COEFFICIENTS, float(hyper_lr))
    bad = {k: v for k, v in lrs.items() if not v >= 0.0}
    if bad:
        raise ValueError(f"MADA: hyper_lr must be >= 0 (0 freezes a coefficient), got {bad}")
    return lrs


def check_arguments(lr: float, eps: float, weight_decay: float, coeffs: Mapping[str, float],
                    hyper_lr: Mapping[str, float], vmax: str) -> None:
    """Raise one ``ValueError`` naming the first invalid argument and its valid range."""
    if not lr >= 0.0:
        raise ValueError(f"MADA: lr must be >= 0, got {lr}")
    if not eps >= 0.0:
        raise ValueError(f"MADA: eps must be >= 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"MADA: weight_decay must be >= 0, got {weight_decay}")
    for k in ("beta1", "beta2", "beta3"):
        if not 0.0 <= coeffs[k] < 1.0:
            raise ValueError(f"MADA: {k} must be in [0, 1), got {coeffs[k]}")
    for k in ("c", "rho", "gamma"):
        if not 0.0 <= coeffs[k] <= 1.0:
            raise ValueError(f"MADA: {k} must be in [0, 1], got {coeffs[k]}")
    for k, v in coeffs.items():
        lo, hi = RANGES[k]
        if hyper_lr[k] > 0 and not lo <= v <= hi:
            raise ValueError(f"MADA: a learned {k} must start in its range [{lo}, {hi}], got "
                             f"{v} (or freeze it with hyper_lr={{'{k}': 0}})")
    if vmax not in VMAX_MODES:
        raise ValueError(f"MADA: vmax must be 'avg' (AVGrad) or 'max' (AMSGrad), got {vmax!r}")


def _covering_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """A 1-D view of the storage the ``tensors`` occupy back to back (same storage, contiguous,
    consecutive offsets, in order), or None when they are not laid out that way."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.storage_offset() != offset
                or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += t.numel()
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                   (offset - first.storage_offset(),))


class _Flat:
    """Parameters of one cluster seen as one flat vector: ``x`` (parameters), ``grad`` and
    ``state`` (per key). The per-parameter state tensors are views into one flat buffer per key
    (laid out so on first use), so the update works on the buffers in place and ``state_dict``
    keeps torch's per-parameter layout; parameters are concatenated and :meth:`write_back`
    copies them back (a single contiguous parameter is updated in place)."""

    def __init__(self, params: list[torch.Tensor], states: list[dict[str, Any]]) -> None:
        self.params, self.states = params, states
        keys = [k for k, v in states[0].items() if k not in SCALARS and torch.is_tensor(v)]
        self.x = _covering_view([p.detach() for p in params])
        self.inplace = self.x is not None
        if self.x is None:
            self.x = torch.cat([p.detach().reshape(-1) for p in params])
        grads = [p.grad for p in params]
        self.grad = _covering_view(grads)
        if self.grad is None:
            self.grad = torch.cat([g.reshape(-1) for g in grads])
        self.state: dict[str, Any] = {k: self._flat_state(k) for k in keys}
        for k in SCALARS:  # one counter shared by the cluster (equal values, by construction)
            if k in states[0]:
                for st in states:
                    st[k] = states[0][k]
            self.state[k] = states[0].get(k)

    def _flat_state(self, key: str) -> torch.Tensor:
        tensors = [st[key] for st in self.states]
        flat = _covering_view(tensors)
        if flat is None:
            flat = torch.cat([t.reshape(-1) for t in tensors])
            pieces = torch.split(flat, [t.numel() for t in tensors])
            for st, piece, t in zip(self.states, pieces, tensors, strict=True):
                st[key] = piece.view(t.shape)
        return flat

    def count_step(self) -> None:
        for k in SCALARS:
            if self.state[k] is not None:
                self.state[k] += 1

    def write_back(self) -> None:
        if not self.inplace:
            sizes = [p.numel() for p in self.params]
            torch._foreach_copy_([p.detach().view(-1) for p in self.params],
                                 list(torch.split(self.x, sizes)))


def resolve_betas(who: str, beta1: float | None, beta2: float | None,
                  betas: tuple[float, float] | None) -> tuple[float, float]:
    """``(beta1, beta2)`` from either spelling (defaults 0.9, 0.999); a ``ValueError`` naming
    ``who`` when both spellings are given or ``betas`` is not two numbers. Pure."""
    if betas is None:
        return (0.9 if beta1 is None else beta1), (0.999 if beta2 is None else beta2)
    if beta1 is not None or beta2 is not None:
        raise ValueError(f"{who}: give betas=(beta1, beta2) or beta1=/beta2=, not both")
    if len(betas) != 2:
        raise ValueError(f"{who}: betas must be (beta1, beta2), got {betas}")
    return float(betas[0]), float(betas[1])


class MADA(torch.optim.Optimizer):
    """MADA over ``params`` (see the module docstring for the update and its cost).

    ``hyper_lr``: one hyper learning rate for every coefficient, or a mapping from coefficient
    name to its own (missing ones frozen); 0 freezes. ``hypergrad_reduce``: optional function
    applied to the float64 vector of hyper-gradients (in :data:`COEFFICIENTS` order, learned ones
    only) before the hyper-step, e.g. an average over data-parallel ranks; it is called once per
    param group per step (with zeros at the first), so it must be collective if it communicates.
    Sparse gradients are refused. ``step`` is not collective unless ``hypergrad_reduce`` is.
    ``betas=(beta1, beta2)`` is torch's spelling of ``beta1``/``beta2`` (give one or the other;
    both is a ``ValueError``)."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, beta1: float | None = None,
                 beta2: float | None = None, beta3: float = 0.0, c: float = 1.0, rho: float = 0.6,
                 gamma: float = 1.0, eps: float = 1e-8, weight_decay: float = 0.0,
                 hyper_lr: float | Mapping[str, float] = DEFAULT_HYPER_LR,
                 vmax: str = "avg", lion_betas: tuple[float, float] = (0.95, 0.98),
                 hyper_clip: float = 10.0,
                 hypergrad_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 betas: tuple[float, float] | None = None) -> None:
        beta1, beta2 = resolve_betas("MADA", beta1, beta2, betas)
        coeffs = {"beta1": beta1, "beta2": beta2, "beta3": beta3, "c": c, "rho": rho,
                  "gamma": gamma}
        lrs = _hyper_lrs(hyper_lr)
        check_arguments(lr, eps, weight_decay, coeffs, lrs, vmax)
        if not all(0.0 <= b < 1.0 for b in lion_betas) or len(lion_betas) != 2:
            raise ValueError(f"MADA: lion_betas must be two numbers in [0, 1), got {lion_betas}")
        if not hyper_clip > 0.0:
            raise ValueError(f"MADA: hyper_clip must be > 0, got {hyper_clip}")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, hyper_lr=lrs, vmax=vmax,
                        lion_betas=tuple(lion_betas), hyper_clip=hyper_clip,
                        hypergrad=dict.fromkeys(COEFFICIENTS, 0.0), **coeffs)
        super().__init__(params, defaults)
        self.hypergrad_reduce = hypergrad_reduce

    @property
    def coefficients(self) -> dict[str, float]:
        """The current coefficients of the first param group."""
        return {k: self.param_groups[0][k] for k in COEFFICIENTS}

    @staticmethod
    def learned(group: Mapping[str, Any]) -> list[str]:
        """The coefficients of ``group`` with a positive hyper learning rate."""
        return [k for k in COEFFICIENTS if group["hyper_lr"][k] > 0]

    def _clusters(self, group: Mapping[str, Any]) -> list[_Flat]:
        """The group's parameters with a gradient, as flat vectors: one :class:`_Flat` per set
        of parameters sharing dtype, step count and state keys (normally one for the group)."""
        clusters: dict[tuple, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("MADA does not support sparse gradients; densify them first "
                                   "(e.g. use a dense exchange or dense embeddings)")
            st = self.state[p]
            key = (float(st.get("step", 0.0)), p.dtype, tuple(sorted(st)))
            clusters.setdefault(key, []).append(p)
        return [_Flat(members, [self.state[p] for p in members])
                for members in clusters.values()]

    @torch.no_grad()
    def hypergradient(self, group: Mapping[str, Any]) -> dict[str, float]:
        """∂L/∂z for each learned coefficient z of ``group``: the sum over its parameters of
        <current grad, stored ∂x/∂z of the previous step> (0 where nothing is stored yet)."""
        return self._hypergradient(group, self._clusters(group))

    def _hypergradient(self, group: Mapping[str, Any], flats: list[_Flat]) -> dict[str, float]:
        out = dict.fromkeys(self.learned(group), 0.0)
        for f in flats:
            for k in out:
                if f"d_{k}" in f.state:
                    out[k] += float(torch.dot(f.grad, f.state[f"d_{k}"]))
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not p.grad.is_sparse:
                    self._init_state(p, group)
            flats = self._clusters(group)
            if self.learned(group):
                self._hyper_step(group, self._hypergradient(group, flats))
            for f in flats:
                f.count_step()
                self._update(f.x, f.grad, f.state, group)
                f.write_back()
        return loss

    def _hyper_step(self, group: dict[str, Any], h: dict[str, float]) -> None:
        vec = torch.tensor(list(h.values()), dtype=torch.float64)
        if self.hypergrad_reduce is not None:
            vec = self.hypergrad_reduce(vec)
        vec = vec.clamp(-group["hyper_clip"], group["hyper_clip"])
        for k, hk in zip(h, vec.tolist(), strict=True):
            lo, hi = RANGES[k]
            group[k] = min(hi, max(lo, group[k] - group["hyper_lr"][k] * hk))
        group["hypergrad"] = {**group["hypergrad"], **dict(zip(h, vec.tolist(), strict=True))}

    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Allocate the state ``p`` needs under the group's current coefficients."""
        learned = set(self.learned(group))
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        if (group["beta3"] != 0 or "beta3" in learned) and "diff_avg" not in state:
            state["diff_avg"] = torch.zeros_like(p)
            state["prev_grad"] = p.grad.clone()
        if (group["rho"] != 1 or "rho" in learned) and "v_bar" not in state:
            state["v_bar"] = state["exp_avg_sq"].clone()
            state["v_bar_steps"] = torch.tensor(0.0)
        if (group["gamma"] != 1 or "gamma" in learned) and "lion_avg" not in state:
            state["lion_avg"] = torch.zeros_like(p)
        for k in learned:
            if f"d_{k}" not in state:
                state[f"d_{k}"] = torch.zeros_like(p)

    def _update(self, x: torch.Tensor, g: torch.Tensor, state: dict[str, Any],
                group: dict[str, Any]) -> None:
        """The MADA step of the module docstring on the flat parameters ``x`` (in place) with
        gradient ``g`` and the matching flat ``state`` (in place, step already counted)."""
        b1, b2, b3, c, rho, gm = (group[k] for k in COEFFICIENTS)
        lr, eps = group["lr"], group["eps"]
        learned = set(self.learned(group))
        t = float(state["step"])
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        m, v_tilde = state["exp_avg"], state["exp_avg_sq"]
        d_list = {}

        # First moment: m̂ = m̄ / bc1 + β3 n, kept as num / bc1 with num = m̄ + β3 bc1 n.
        if "beta1" in learned:
            d_list["m_b1"] = m - g
        m.lerp_(g, 1 - b1)
        if "diff_avg" in state:
            n = state["diff_avg"]
            diff = g - state["prev_grad"]
            if "beta3" in learned:
                d_list["n_b3"] = n - diff
            n.mul_(b3).add_(diff, alpha=1 - b3)
            state["prev_grad"].copy_(g)
            g_hat = g + b3 * diff
            num = m + (b3 * bc1) * n
        else:
            diff, n, g_hat, num = None, None, g, m

        # Second moment.
        yogi = sign = q = None
        if c != 1 or "c" in learned:
            q = g_hat * g_hat
            sign = torch.sign(q - v_tilde)
            yogi = v_tilde + q * sign
            g2 = c * q + (1 - c) * yogi
            if "beta2" in learned:
                d_list["vt_b2"] = v_tilde - g2
            v_tilde.mul_(b2).add_(g2, alpha=1 - b2)
        else:
            if "beta2" in learned:
                d_list["vt_b2"] = v_tilde - g_hat * g_hat
            v_tilde.mul_(b2).addcmul_(g_hat, g_hat, value=1 - b2)
        select = None
        if "v_bar" in state:
            v_bar = state["v_bar"]
            if group["vmax"] == "max":
                select = (v_tilde > v_bar).to(x.dtype)
                torch.maximum(v_bar, v_tilde, out=v_bar)
            else:
                select = 1.0 / float(state["v_bar_steps"])
                v_bar.lerp_(v_tilde, select)
            v = v_tilde if rho == 1 else v_bar if rho == 0 else rho * v_tilde + (1 - rho) * v_bar
        else:
            v_bar, v = None, v_tilde
        root = v.sqrt() / math.sqrt(bc2)
        denom = root + eps

        lion = None
        if "lion_avg" in state:
            lb1, lb2 = group["lion_betas"]
            lion = torch.sign(state["lion_avg"].lerp(g, 1 - lb1))
            state["lion_avg"].lerp_(g, 1 - lb2)

        if learned:
            self._store_derivatives(state, learned, d_list, m_bar=m, diff=diff, n=n,
                                    g_hat=g_hat, num=num, v=v, v_tilde=v_tilde, v_bar=v_bar,
                                    select=select, yogi=yogi, sign=sign, q=q, root=root,
                                    denom=denom, lion=lion, group=group, t=t)

        if group["weight_decay"]:
            x.mul_(1 - lr * group["weight_decay"])
        x.addcdiv_(num, denom, value=-(lr / bc1) * gm)
        if lion is not None and gm != 1:
            x.add_(lion, alpha=-lr * (1 - gm))

    @staticmethod
    def _store_derivatives(state: dict[str, Any], learned: set[str],
                           d_list: dict[str, torch.Tensor], *, m_bar: torch.Tensor,
                           diff: torch.Tensor | None, n: torch.Tensor | None,
                           g_hat: torch.Tensor, num: torch.Tensor, v: torch.Tensor,
                           v_tilde: torch.Tensor, v_bar: torch.Tensor | None,
                           select: torch.Tensor | float | None, yogi: torch.Tensor | None,
                           sign: torch.Tensor | None, q: torch.Tensor | None,
                           root: torch.Tensor, denom: torch.Tensor,
                           lion: torch.Tensor | None, group: dict[str, Any], t: float) -> None:
        """state["d_<z>"] = ∂x_{t+1}/∂z = -η ∂u_t/∂z for each learned z (closed form; the
        previous state is held fixed, sign() and the max selection have derivative 0)."""
        b1, b2, b3, c, rho, gm = (group[k] for k in COEFFICIENTS)
        lr = group["lr"]
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        scale = -lr * gm                                   # ∂x/∂z = scale · ∂A/∂z
        adaptive = num.div(denom).mul_(1 / bc1)            # A = m̂ / (√v̂ + ε)
        # kv = scale · ∂A/∂v̂ = scale · (-A / (2 √v̂ (√v̂ + ε))); where v̂ = 0 (no gradient ever
        # seen) A = 0 and every ∂v̂ is 0, and the clamp keeps kv finite (0).
        kv = adaptive.div(root.clamp_min(1e-30).mul_(denom)).mul_(-0.5 * scale)
        # ∂v̂/∂ṽ_t through v̄ and the ρ interpolation: (ρ + (1 - ρ) ∂v̄/∂ṽ) / bc2.
        vfac: torch.Tensor | float = 1 / bc2
        if v_bar is not None:
            vfac = select * ((1 - rho) / bc2) + rho / bc2

        if "beta1" in learned:
            out = d_list["m_b1"].mul_(scale / bc1).add_(m_bar, alpha=scale * t * b1 ** (t - 1)
                                                          / bc1 ** 2)
            torch.div(out, denom, out=state["d_beta1"])
        if "beta2" in learned:
            out = d_list["vt_b2"].mul_(vfac).add_(v, alpha=t * b2 ** (t - 1) / bc2 ** 2)
            torch.mul(out, kv, out=state["d_beta2"])
        if "beta3" in learned:
            out = torch.mul(g_hat, diff, out=state["d_beta3"]).mul_(vfac).mul_(kv)
            if sign is not None:
                out.mul_(sign.mul_(1 - c).add_(c))
            out.mul_(2 * (1 - b2))
            out.add_(d_list["n_b3"].mul_(b3).add_(n).div_(denom), alpha=scale)
        if "c" in learned:
            torch.sub(q, yogi, out=state["d_c"]).mul_(vfac).mul_(kv).mul_(1 - b2)
        if "rho" in learned:
            torch.sub(v_tilde, v_bar, out=state["d_rho"]).mul_(kv).mul_(1 / bc2)
        if "gamma" in learned:
            torch.sub(adaptive, lion, out=state["d_gamma"]).mul_(-lr)
