"""LinkModel: a simulated network link (bandwidth, latency) that delays operations.

The link is one FIFO egress resource per rank: an operation that puts ``nbytes`` on the
wire in ``rounds`` sequential message rounds costs ``latency * rounds + 8 * framed(nbytes) /
bandwidth`` seconds (:func:`commtrain.comm.price.link_seconds`; ``framing="tcp"`` charges
the TCP/IP/Ethernet headers of every segment, as a shaped link does) and cannot start
before the previous operation on the link has finished::

    completion = max(now, link_free_at) + cost

Communicators of one rank that are given the *same* LinkModel instance share that
clock, as the data- and pipeline-parallel groups of one process share one NIC.

Units (``"100mbit"``, ``"12.5GB/s"``, ``"50us"``) are parsed by :mod:`commtrain.units`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import yaml

from .. import resources
from ..units import parse_bandwidth, parse_latency
from .price import framing as _framing, link_seconds

# Named link profiles ship with the package (``link.profile=1gbit``): commtrain/comm/link_profiles/.
PROFILE_DIR = resources.directory(__package__, "link_profiles")


@dataclass
class LinkModel:
    """``bandwidth_bps`` in bits per second (None = unthrottled), ``latency_s`` per message round,
    ``framing`` the per-segment overhead the link charges (a :data:`price.FRAMINGS` name)."""

    bandwidth_bps: float | None = None
    latency_s: float = 0.0
    name: str = ""
    framing: str = "none"
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)
    _free_at: float = field(default=0.0, init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.bandwidth_bps is not None:
            self.bandwidth_bps = parse_bandwidth(self.bandwidth_bps)
        self.latency_s = parse_latency(self.latency_s)
        self.framing = _framing(self.framing).name

    # -- construction ------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: str) -> "LinkModel":
        """``"100mbit"``, ``"1gbit,50us"`` (bandwidth[,latency]) or ``"none"`` (unthrottled)."""
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"link spec={spec!r} is invalid; expected e.g. '100mbit', '1gbit,50us' or 'none'")
        if spec.strip().lower() in ("none", "unthrottled", "inf"):
            return cls(name="unthrottled")
        parts = [p.strip() for p in spec.split(",")]
        if len(parts) > 2:
            raise ValueError(f"link spec={spec!r} is invalid; expected 'bandwidth[,latency]', e.g. '1gbit,50us'")
        latency = parse_latency(parts[1]) if len(parts) == 2 else 0.0
        return cls(parse_bandwidth(parts[0]), latency, name=spec.strip())

    @property
    def throttled(self) -> bool:
        return self.bandwidth_bps is not None or self.latency_s > 0

    # -- the cost model ------------------------------------------------------------------
    def cost_s(self, nbytes: int, rounds: int = 1) -> float:
        """Seconds the modeled link needs for ``nbytes`` in ``rounds`` message rounds."""
        return link_seconds(nbytes, rounds, self.bandwidth_bps, self.latency_s, self.framing)

    def reserve(self, nbytes: int, rounds: int = 1) -> tuple[float, float]:
        """Book the link for one operation starting now; returns (deadline, cost_s).

        ``deadline`` is a ``time.monotonic()`` instant: the modeled completion, queued
        behind whatever this link already carries (FIFO).
        """
        cost = self.cost_s(nbytes, rounds)
        now = time.monotonic()
        if not self.throttled:
            return now, cost
        with self._lock:
            deadline = max(now, self._free_at) + cost
            self._free_at = deadline
        return deadline, cost

    @staticmethod
    def wait_until(deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def describe(self) -> str:
        if not self.throttled:
            return "unthrottled"
        bw = "inf" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e9:g} Gbit/s"
        frame = "" if self.framing == "none" else f", {self.framing} framing"
        return f"{bw}, {self.latency_s * 1e6:g} us{frame}"


def available_link_profiles() -> list[str]:
    return resources.names(PROFILE_DIR)


def load_link_profile(name: str) -> LinkModel:
    """A packaged profile by name (``commtrain/comm/link_profiles/<name>.yaml``: ``100mbit``,
    ``1gbit``, ...) or a path to such a file."""
    path = resources.find(name, PROFILE_DIR, "link profile")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or "bandwidth" not in data:
        raise ValueError(f"link profile {path}: missing 'bandwidth' (e.g. bandwidth: 1gbit)")
    bw = data["bandwidth"]
    bandwidth = None if bw is None or str(bw).lower() in ("none", "inf") else parse_bandwidth(bw)
    stem = path.name.rsplit(".", 1)[0]
    return LinkModel(bandwidth, parse_latency(data.get("latency", 0.0)), name=str(data.get("name", stem)),
                     framing=str(data.get("framing", "none")))


def resolve_link(link: "LinkModel | str | None") -> LinkModel:
    """Config helper: a LinkModel, a profile name, a spec such as '100mbit,50us', or None."""
    if link is None:
        return LinkModel(name="unthrottled")
    if isinstance(link, LinkModel):
        return link
    # Not looks_like_path: a spec such as "25GB/s,50us" has a slash but is no file.
    if isinstance(link, str) and (resources.is_packaged(link, PROFILE_DIR) or link.endswith(resources.SUFFIXES)):
        return load_link_profile(link)
    try:
        return LinkModel.parse(link)
    except ValueError as e:
        raise ValueError(f"{e}; or a profile name: {', '.join(available_link_profiles())}") from None


@dataclass
class LinkConfig:
    """The ``link`` section: a named profile, or a bandwidth/latency pair, or nothing (unthrottled)."""

    profile: Optional[str] = None  # a link profile name (e.g. 100mbit, 1gbit, 10gbit) or a YAML path
    bandwidth: Optional[str] = None  # e.g. "100mbit", "1gbit", "12.5GB" (per second)
    latency: Optional[str] = None  # e.g. "50us", "1ms"
    # per-segment overhead the link charges: "tcp" (TCP/IP/Ethernet headers, what a tc-shaped or
    # Ethernet link charges) or "none"; default: the profile's, else "none"
    framing: Optional[str] = None

    def validate(self) -> None:
        from ..validate import ConfigError

        if self.profile is not None and (self.bandwidth is not None or self.latency is not None):
            raise ConfigError(
                f"link: give either link.profile ({self.profile!r}) or link.bandwidth/link.latency, not both"
            )
        try:
            self.build()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"link: {e}") from None

    def build(self) -> LinkModel | None:
        """The LinkModel this section describes, or None for an unthrottled link."""
        if self.profile is not None:
            link = load_link_profile(self.profile)
        elif self.bandwidth is None and self.latency is None:
            return None
        elif self.bandwidth is None:  # a latency-only link has no bandwidth cap
            link = LinkModel(None, parse_latency(self.latency), name=f"latency {self.latency}")
        else:
            link = LinkModel.parse(f"{self.bandwidth},{self.latency or '0s'}")
        if self.framing is not None:
            link.framing = _framing(self.framing).name
        return link
