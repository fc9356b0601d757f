"""The wire: compressed collectives and p2p on torch.distributed, one byte meter, a link throttle.

>>> from commtrain.comm import Communicator, LinkModel, ByteMeter, load_link_profile, CHANNELS
"""
from . import price
from .communicator import OPS, Communicator
from .handle import Handle
from .link import LinkConfig, LinkModel, available_link_profiles, load_link_profile, parse_bandwidth, parse_latency, resolve_link
from .meter import CHANNELS, ByteMeter
from .protocol import WireCodec
from .wire import LoopbackWire, Wire

__all__ = [
    "CHANNELS", "OPS", "ByteMeter", "Communicator", "Handle", "LinkConfig", "LinkModel", "LoopbackWire", "Wire", "WireCodec",
    "available_link_profiles", "load_link_profile", "parse_bandwidth", "parse_latency", "price", "resolve_link",
]
