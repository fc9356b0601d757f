"""Hardware and interconnect profiles for the throughput model (package data beside this module).

A *hardware profile* (``hardware_profiles/<name>.yaml``) describes one kind of node: GPUs
per node, their dense peak TFLOP/s per precision, memory, the per-GPU intra-node link
(bandwidth one direction + latency), the node's inter-node NICs (an *interconnect*
profile from ``hardware_profiles/interconnects/<name>.yaml`` times a port count) and a price
per hour with its basis. Every figure carries its ``sources`` so that a reader can check it.
Both are read with :mod:`importlib.resources`; a path to a YAML file of one's own works
wherever a profile name does.

Units are those of :mod:`commtrain.units` (``"13GB/s"``, ``"200gbit"``, ``"5us"``), so
a profile reads like the simulated-link profiles in ``commtrain/comm/link_profiles/``.

>>> load_hardware("rtx3090-pcie").peak_flops("bf16") == 71e12
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from .. import resources
from ..resources import Resource
from ..units import parse_bandwidth, parse_latency

HARDWARE_DIR = resources.directory(__package__, "hardware_profiles")
INTERCONNECT_DIR = HARDWARE_DIR.joinpath("interconnects")
PRECISIONS = ("bf16", "fp16", "fp32")
CATEGORIES = ("consumer", "server")
# Figures every hardware profile must cite.
SOURCED_FIGURES = ("tflops", "memory_gb", "intra_node", "inter_node", "price")


@dataclass(frozen=True)
class Interconnect:
    """A network port type: ``bandwidth_bps`` (bits/s, one direction) and one-way ``latency_s``."""

    name: str
    bandwidth_bps: float
    latency_s: float
    description: str = ""
    sources: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu: str
    category: str  # consumer | server
    gpus_per_node: int
    tflops: Mapping[str, float | None]  # dense peaks; None = precision not supported
    memory_gb: float
    intra_bandwidth_bps: float  # per GPU, one direction
    intra_latency_s: float
    inter_link: Interconnect
    inter_ports: int
    price_per_hour: float | None  # USD per node-hour
    price_basis: str
    sources: Mapping[str, Any]
    description: str = ""

    @property
    def inter_bandwidth_bps(self) -> float:
        """Aggregate NIC bandwidth of one node, bits/s one direction."""
        return self.inter_link.bandwidth_bps * self.inter_ports

    def precision_used(self, precision: str) -> str:
        """The precision actually run: bf16 falls back to fp16 where the GPU lacks bf16 (V100)."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is invalid; allowed: {', '.join(PRECISIONS)}")
        if self.tflops.get(precision) is None and precision == "bf16" and self.tflops.get("fp16"):
            return "fp16"
        if self.tflops.get(precision) is None:
            raise ValueError(f"hardware {self.name!r} has no {precision} figure; it supports "
                             f"{', '.join(k for k, v in self.tflops.items() if v)}")
        return precision

    def peak_flops(self, precision: str = "bf16") -> float:
        """Dense peak FLOP/s of one GPU at ``precision`` (see :meth:`precision_used`)."""
        return float(self.tflops[self.precision_used(precision)]) * 1e12


# -- loading ------------------------------------------------------------------------------------
def available_hardware() -> list[str]:
    return resources.names(HARDWARE_DIR)


def available_interconnects() -> list[str]:
    return resources.names(INTERCONNECT_DIR)


def _stem(path: Resource) -> str:
    return path.name.rsplit(".", 1)[0]


def _read(path: Resource) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _field(path: Resource, data: Mapping, key: str, what: str):
    if key not in data or data[key] is None:
        raise ValueError(f"{path}: missing field {key!r} ({what})")
    return data[key]


def _positive(path: Resource, key: str, value, integer: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if ok and integer and int(value) != value:
        ok = False
    if not ok:
        kind = "an integer >= 1" if integer else "a number > 0"
        raise ValueError(f"{path}: field {key}={value!r} is invalid; allowed: {kind}")
    return int(value) if integer else float(value)


def _parsed(path: Resource, key: str, value, parser) -> float:
    try:
        return parser(value)
    except ValueError as e:
        raise ValueError(f"{path}: field {key}: {e}") from None


def load_interconnect(name: str) -> Interconnect:
    """``hardware_profiles/interconnects/<name>.yaml`` (or a path): fields bandwidth, latency, sources."""
    path = resources.find(name, INTERCONNECT_DIR, "interconnect")
    data = _read(path)
    bw = _parsed(path, "bandwidth", _field(path, data, "bandwidth", "per port, one direction, e.g. 10gbit"),
                 parse_bandwidth)
    lat = _parsed(path, "latency", _field(path, data, "latency", "one-way, e.g. 20us"), parse_latency)
    sources = _field(path, data, "sources", "where the figures come from")
    for key in ("bandwidth", "latency"):
        if not isinstance(sources, Mapping) or not sources.get(key):
            raise ValueError(f"{path}: field sources.{key} is missing; every figure needs a source")
    return Interconnect(str(data.get("name", _stem(path))), bw, lat, str(data.get("description", "")).strip(), sources)


def load_hardware(name: str) -> HardwareProfile:
    """``hardware_profiles/<name>.yaml`` (or a path), validated; errors name the file and field."""
    path = resources.find(name, HARDWARE_DIR, "hardware")
    d = _read(path)
    category = _field(path, d, "category", f"one of {', '.join(CATEGORIES)}")
    if category not in CATEGORIES:
        raise ValueError(f"{path}: field category={category!r} is invalid; allowed: {', '.join(CATEGORIES)}")
    gpus = _positive(path, "gpus_per_node", _field(path, d, "gpus_per_node", "GPUs in one node"), integer=True)

    tflops = _field(path, d, "tflops", "dense peak TFLOP/s per precision: bf16, fp16, fp32")
    if not isinstance(tflops, Mapping):
        raise ValueError(f"{path}: field tflops must be a mapping of {', '.join(PRECISIONS)} to numbers (or null)")
    unknown = set(tflops) - set(PRECISIONS)
    if unknown:
        raise ValueError(f"{path}: field tflops has unknown key(s) {sorted(unknown)}; allowed: {', '.join(PRECISIONS)}")
    peaks = {p: (None if tflops.get(p) is None else _positive(path, f"tflops.{p}", tflops[p])) for p in PRECISIONS}
    if not any(peaks.values()):
        raise ValueError(f"{path}: field tflops gives no figure; allowed: numbers for {', '.join(PRECISIONS)}")
    memory = _positive(path, "memory_gb", _field(path, d, "memory_gb", "GPU memory in GB"))

    intra = _field(path, d, "intra_node", "per-GPU link inside a node: bandwidth, latency")
    if not isinstance(intra, Mapping):
        raise ValueError(f"{path}: field intra_node must be a mapping with bandwidth and latency")
    intra_bw = _parsed(path, "intra_node.bandwidth", _field(path, intra, "bandwidth", "intra_node.bandwidth"),
                       parse_bandwidth)
    intra_lat = _parsed(path, "intra_node.latency", _field(path, intra, "latency", "intra_node.latency"),
                        parse_latency)

    inter = _field(path, d, "inter_node", "node NICs: link (an interconnect profile), ports")
    if not isinstance(inter, Mapping):
        raise ValueError(f"{path}: field inter_node must be a mapping with link and ports")
    try:
        link = load_interconnect(_field(path, inter, "link", "inter_node.link"))
    except ValueError as e:
        raise ValueError(f"{path}: field inter_node.link: {e}") from None
    ports = _positive(path, "inter_node.ports", inter.get("ports", 1), integer=True)

    price = d.get("price") or {}
    if not isinstance(price, Mapping):
        raise ValueError(f"{path}: field price must be a mapping with usd_per_hour and basis")
    usd = price.get("usd_per_hour")
    usd = None if usd is None else _positive(path, "price.usd_per_hour", usd)
    basis = str(price.get("basis", "")).strip()
    if usd is not None and not basis:
        raise ValueError(f"{path}: field price.basis is missing (say: cloud on-demand or amortised purchase, and which)")

    sources = _field(path, d, "sources", "a list of sources per figure")
    if not isinstance(sources, Mapping):
        raise ValueError(f"{path}: field sources must map each figure to a list of sources")
    for key in SOURCED_FIGURES:
        if key == "price" and usd is None:
            continue
        if not sources.get(key):
            raise ValueError(f"{path}: field sources.{key} is missing; every figure needs a source")

    return HardwareProfile(
        name=str(d.get("name", _stem(path))), gpu=str(d.get("gpu", "")), category=category, gpus_per_node=gpus, tflops=peaks,
        memory_gb=memory, intra_bandwidth_bps=intra_bw, intra_latency_s=intra_lat, inter_link=link,
        inter_ports=ports, price_per_hour=usd, price_basis=basis, sources=sources,
        description=str(d.get("description", "")).strip(),
    )
