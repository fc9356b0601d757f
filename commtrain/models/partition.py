"""Contiguous min-max partition of a layer list into pipeline stages.

A pipeline step is as slow as its slowest stage, so stages are chosen to minimise the
largest per-stage cost (layer count or parameter count) subject to every stage holding at
least one layer and the layers keeping their order. Exact dynamic programming: the layer
lists are short (tens of entries), so O(n^2 k) is instant.
"""
from __future__ import annotations

BALANCE_MODES = ("layers", "params")


def partition(costs: list[float], n_stages: int) -> list[tuple[int, int]]:
    """Split ``costs`` into ``n_stages`` contiguous, non-empty ranges ``[(start, stop), ...]``.

    Minimises the maximum range sum; among optimal splits the earliest boundaries win, so the
    result is deterministic.
    """
    n = len(costs)
    if not isinstance(n_stages, int) or isinstance(n_stages, bool) or not 1 <= n_stages <= n:
        raise ValueError(f"n_stages={n_stages!r} is invalid; allowed: 1..{n} (one stage holds at least one of the {n} layers)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: minimal max-cost splitting the first i layers into k stages; cut[k][i]: start of the last stage.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for k in range(1, n_stages + 1):
        for i in range(k, n - (n_stages - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], n
    for k in range(n_stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def layer_costs(layers, balance: str) -> list[float]:
    """Per-layer cost for ``balance``: 1 per layer, or its parameter count (shared tensors once per layer)."""
    if balance == "layers":
        return [1.0] * len(layers)
    if balance == "params":
        return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]
    raise ValueError(f"balance={balance!r} is invalid; allowed: {', '.join(BALANCE_MODES)}")
