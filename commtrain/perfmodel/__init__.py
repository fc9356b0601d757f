"""Throughput model: predicted step time and tokens/s of a training setup, from FLOPs and from
the *exact* wire bytes the codecs produce.

Why a model: "with my GPUs and my network, which layout and which compression gives the most
tokens per second (and per dollar)?" can be answered before renting anything, and the same
model, fed a machine's measured compute time, predicts the trainer's throttled runs (so it is
checked against measurements, not just plausible).

=================  ===========================================================================
module             what it holds
=================  ===========================================================================
:mod:`.shapes`     per-stage parameter shapes and FLOPs/token (``6 N + 12 L T C``), on meta
:mod:`.network`    per-rank transfers of every collective -- bytes and rounds from
                   :mod:`commtrain.comm.price`, node topology on top -- and the networks
                   (one link per rank, or GPUs in nodes with shared NICs)
:mod:`.overlap`    codec compute speed, and the overlapped reduction simulated event by event
:mod:`.memory`     a rough per-GPU memory estimate (model states, activations)
:mod:`.predict`    :func:`predict_step` -> :class:`Prediction`
:mod:`.report`     ``commtrain compare``: table and plot over hardware x codecs
:mod:`.hardware`   hardware and interconnect profiles (YAML package data beside it, every
                   figure with its source)
=================  ===========================================================================

>>> from commtrain.perfmodel import predict_step
>>> p = predict_step("gpt2-124m", global_batch=64, seq_len=1024, dp=8, hardware="dgx-a100",
...                  codecs={"grad": "quant:bits=4,group=128"})
>>> p.wire_bytes["grad"] < 2 * 7 / 8 * 4 * p.params / 7
True
"""
from .hardware import (
    HardwareProfile, Interconnect, available_hardware, available_interconnects, load_hardware, load_interconnect,
)
from .network import (
    Group, LinkNetwork, NodeNetwork, Transfer, all_gather, all_gather_flat, all_reduce, all_to_all, as_link_network,
    powersgd_all_reduces, reduce_scatter, ring_all_reduce,
)
from .overlap import CodecSpeed, measure_codec_speed, simulate_overlap
from .predict import ACT_DTYPES, ZERO_STAGES, Prediction, bubble_fraction, predict_step
from .report import compare_main, format_table, plot_comparison, split_codec_list, split_list
from .shapes import ModelShape, StageShape, describe_model

__all__ = [
    "ACT_DTYPES", "CodecSpeed", "Group", "HardwareProfile", "Interconnect", "LinkNetwork", "ModelShape", "NodeNetwork",
    "Prediction", "StageShape", "Transfer", "ZERO_STAGES", "all_gather", "all_gather_flat", "all_reduce", "all_to_all",
    "as_link_network", "available_hardware", "available_interconnects", "bubble_fraction", "compare_main",
    "describe_model", "format_table", "load_hardware", "load_interconnect", "measure_codec_speed", "plot_comparison",
    "powersgd_all_reduces", "predict_step", "reduce_scatter", "ring_all_reduce", "simulate_overlap",
    "split_codec_list", "split_list",
]
