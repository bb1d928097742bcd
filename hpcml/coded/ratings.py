"""Rating data for collaborative filtering: observed entries (user, item, value) of an n x d
matrix, from a seeded MovieLens-like generator or scikit-learn's digits images (matrix
completion), and a seeded train/test split. Pure functions, no MPI; deterministic per seed.

Generator (:func:`synthetic_ratings`): latent factors u_i, v_j ~ N(0, I / sqrt(rank)) (so
u_i . v_j has unit variance), ratings clip(round(3 + u_i . v_j + noise * N(0, 1)), 1, 5).
The observation pattern has power-law (Zipf-like) user activity and item popularity: user i of
activity rank a rates about total * (a + 10)^-0.7 / sum items (capped at d / 2), chosen with
probability proportional to the item's popularity (its rank + 10)^-1 (Gumbel top-k sampling,
without replacement); then every item with fewer than ``MIN_RATINGS`` ratings gets more from
random users. Every user and item ends with at least ``MIN_RATINGS`` ratings, and the density
is ``density`` up to the cap and the top-ups. Users are drawn ``USER_CHUNK`` at a time, so
memory is O(USER_CHUNK x d + ratings), never the dense n x d matrix.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MIN_RATINGS = 5
USER_EXPONENT, ITEM_EXPONENT, OFFSET = 0.7, 1.0, 10.0
USER_CHUNK = 1024


@dataclasses.dataclass
class Ratings:
    """Observed entries of an (n, d) matrix: ``users[o]``, ``items[o]``, ``values[o]``."""

    n: int
    d: int
    users: np.ndarray
    items: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def subset(self, rows: np.ndarray) -> Ratings:
        return Ratings(self.n, self.d, self.users[rows], self.items[rows], self.values[rows])

    def counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Ratings per user (n,) and per item (d,)."""
        return np.bincount(self.users, minlength=self.n), np.bincount(self.items, minlength=self.d)


def synthetic_ratings(n: int, d: int, rank: int, density: float, noise: float,
                      seed: int) -> Ratings:
    """n users x d items with about density * n * d ratings in 1..5 (see the module doc).
    Needs d >= 2 * MIN_RATINGS and n >= MIN_RATINGS."""
    if d < 2 * MIN_RATINGS or n < MIN_RATINGS:
        raise ValueError(f"synthetic_ratings: need >= {2 * MIN_RATINGS} items and "
                         f">= {MIN_RATINGS} users, got {n} x {d}")
    rng = np.random.default_rng([seed, 21])
    u = rng.standard_normal((n, rank)) / rank**0.25
    v = rng.standard_normal((d, rank)) / rank**0.25
    activity = (rng.permutation(n) + OFFSET) ** -USER_EXPONENT
    popularity = (rng.permutation(d) + OFFSET) ** -ITEM_EXPONENT
    per_user = np.rint(density * n * d * activity / activity.sum()).astype(int)
    per_user = np.clip(per_user, MIN_RATINGS, d // 2)
    users, items = [], []
    for start in range(0, n, USER_CHUNK):
        stop = min(n, start + USER_CHUNK)
        keys = np.log(popularity)[None, :] + rng.gumbel(size=(stop - start, d))
        chosen = np.arange(d)[None, :] < per_user[start:stop, None]
        users.append(np.arange(start, stop).repeat(per_user[start:stop]))
        items.append(np.argsort(-keys, axis=1)[chosen])
    users, items = np.concatenate(users), np.concatenate(items)
    per_item = np.bincount(items, minlength=d)
    for j in np.flatnonzero(per_item < MIN_RATINGS):
        missing = np.setdiff1d(np.arange(n), users[items == j])
        extra = rng.choice(missing, size=MIN_RATINGS - per_item[j], replace=False)
        users = np.concatenate([users, extra])
        items = np.concatenate([items, np.full_like(extra, j)])
    order = np.lexsort((items, users))
    users, items = users[order], items[order]
    scores = np.einsum("or,or->o", u[users], v[items])
    values = np.clip(np.rint(3.0 + scores + noise * rng.standard_normal(len(users))), 1, 5)
    return Ratings(n, d, users, items, values)


def matrix_ratings(x: np.ndarray, observed: float, seed: int) -> Ratings:
    """Each entry of the dense matrix x observed independently with probability ``observed``
    (matrix completion), values standardized by the mean and standard deviation of x."""
    rng = np.random.default_rng([seed, 22])
    values = (x - x.mean()) / x.std()
    users, items = np.nonzero(rng.random(x.shape) < observed)
    return Ratings(x.shape[0], x.shape[1], users, items, values[users, items])


def digits_ratings(observed: float, seed: int) -> Ratings:
    """scikit-learn's digits images (1797 x 64 pixels, real data) as a partially observed
    matrix."""
    from sklearn.datasets import load_digits

    return matrix_ratings(load_digits().data.astype(np.float64), observed, seed)


def split(ratings: Ratings, test_fraction: float, seed: int) -> tuple[Ratings, Ratings]:
    """(train, test): a seeded ``test_fraction`` of the entries held out, never the one entry
    per user and per item (chosen at random) that keeps every user and item that has ratings
    in the training set."""
    rng = np.random.default_rng([seed, 23])
    order = rng.permutation(len(ratings))
    keep = np.zeros(len(ratings), dtype=bool)
    for owners in (ratings.users, ratings.items):
        _, first = np.unique(owners[order], return_index=True)
        keep[order[first]] = True
    candidates = order[~keep[order]]
    test = np.sort(candidates[: min(len(candidates), round(test_fraction * len(ratings)))])
    train = np.setdiff1d(np.arange(len(ratings)), test)
    return ratings.subset(train), ratings.subset(test)
