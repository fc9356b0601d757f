"""TokenDataset: a token stream cut into fixed windows, each with a stable integer id.

Window i covers tokens ``[i*T, i*T + T + 1)`` (``T = seq_len``): inputs are the first T
tokens and targets the last T (shifted by one), so consecutive windows share one boundary
token and no token is wasted. The id of a window is ``first_id + i`` and never depends on
rank, epoch or restart: the pipeline's AC-SGD per-sample activation buffers are keyed by it.
"""
from __future__ import annotations

import hashlib

import torch


class TokenDataset:
    def __init__(self, tokens: torch.Tensor, seq_len: int, first_id: int = 0):
        if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
            raise ValueError(f"data.seq_len={seq_len!r} is invalid; allowed: an integer >= 1")
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D tensor, got shape {tuple(tokens.shape)}")
        self.tokens = tokens.to(torch.int64)
        self.seq_len, self.first_id = seq_len, first_id
        self.num_windows = max(0, (tokens.numel() - 1) // seq_len)
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return self.num_windows

    @property
    def ids(self) -> range:
        return range(self.first_id, self.first_id + self.num_windows)

    def __getitem__(self, i: int):
        """Local index ``i`` -> ``(sample_id, x, y)`` with x, y LongTensors of shape (T,)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} windows")
        i %= len(self)
        sid, x, y = self.batch(torch.tensor([self.first_id + i]))
        return int(sid[0]), x[0], y[0]

    def batch(self, sample_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sample ids (B,) -> ``(ids (B,), x (B, T), y (B, T))``, one vectorised gather."""
        ids = torch.as_tensor(sample_ids, dtype=torch.int64).reshape(-1)
        local = ids - self.first_id
        if local.numel() and (local.min() < 0 or local.max() >= len(self)):
            raise IndexError(f"sample ids must lie in [{self.first_id}, {self.first_id + len(self)}); got {ids.tolist()[:8]}...")
        windows = self.tokens[local[:, None] * self.seq_len + self._offsets]  # (B, T+1)
        return ids, windows[:, :-1], windows[:, 1:]

    def fingerprint(self) -> str:
        """Hash of the tokens and windowing: ranks (and restarts) compare it to be sure that
        the same id means the same sample everywhere."""
        h = hashlib.sha256(self.tokens.numpy().tobytes())
        h.update(f"{self.seq_len}:{self.first_id}".encode())
        return h.hexdigest()[:16]


def split_train_eval(tokens: torch.Tensor, seq_len: int, eval_fraction: float) -> tuple[TokenDataset, TokenDataset]:
    """Train = the first windows, eval = the last ``eval_fraction`` of them (at least one when
    the fraction is > 0). Their token ranges do not overlap (the eval stream starts after the
    train stream's last target token), and eval ids continue after train ids."""
    total = max(0, (tokens.numel() - 1) // seq_len)
    n_eval = 0 if eval_fraction <= 0 else max(1, round(total * eval_fraction))
    n_train = total - n_eval
    if n_train < 1 or (n_eval and tokens.numel() - (n_train * seq_len + 1) < seq_len + 1):
        raise ValueError(
            f"corpus too small: {tokens.numel()} tokens make {total} windows of data.seq_len={seq_len}; "
            f"need >= 1 train and (with data.eval_fraction={eval_fraction}) >= 1 eval window: "
            "use a larger corpus (data.max_bytes) or a smaller seq_len"
        )
    cut = n_train * seq_len + 1
    train = TokenDataset(tokens[:cut], seq_len, first_id=0)
    evals = TokenDataset(tokens[cut:] if n_eval else tokens[:0], seq_len, first_id=n_train)
    return train, evals
