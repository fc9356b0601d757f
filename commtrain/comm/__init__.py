"""The wire: compressed collectives and p2p on torch.distributed, one byte meter, a link throttle.

>>> from commtrain.comm import Communicator, LinkModel, ByteMeter, load_link_profile, CHANNELS
"""
from .communicator import OPS, Communicator
from .handle import Handle
from .link import LinkModel, available_link_profiles, load_link_profile, parse_bandwidth, parse_latency, resolve_link
from .meter import CHANNELS, ByteMeter

__all__ = [
    "CHANNELS", "OPS", "ByteMeter", "Communicator", "Handle", "LinkModel", "available_link_profiles",
    "load_link_profile", "parse_bandwidth", "parse_latency", "resolve_link",
]
