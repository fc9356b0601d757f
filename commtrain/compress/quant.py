"""``quant``: uniform b-bit quantisation with per-group scales (QSGD-style stochastic or
round-to-nearest), the workhorse codec for gradients, activations and ZeRO++-style weights.

Math. ``x`` is cut into groups of ``group`` consecutive elements (the last may be partial).
Each group gets a uniform grid of L + 1 points spaced ``step`` apart:

* ``scheme="minmax"``: L = 2^bits - 1, points lo + step * c for c in 0..L, lo = min(x_g),
  step = (max(x_g) - min(x_g)) / L (asymmetric; the two extremes are exactly representable).
  Scales cost 8 bytes per group (lo, step).
* ``scheme="absmax"`` (bits >= 2): L = 2^bits - 2, points q * step for q in -h..h with
  h = L / 2 = 2^(bits-1) - 1 and step = amax / h, amax = max|x_g| (symmetric, as in ZeRO++ /
  CGX and int8's -127..127). Zero is a grid point, so exact zeros (zero-initialised LoRA B
  matrices, masked or pruned weights, padding) round-trip exactly under both roundings; the
  price is one unused code (2^bits - 1) out of 2^bits. bits=1 has no symmetric grid with a
  zero and is refused (use minmax, whose 1-bit grid is {min, max}). Scales cost 4 bytes per
  group (step).

``rounding="nearest"`` rounds v = (x - lo) / step (absmax: v = x / step) half-to-even:
|x' - x| <= step / 2.
``rounding="stochastic"`` takes floor(v + u), u ~ U[0, 1): E[x'] = x and |x' - x| < step
(Alistarh et al., "QSGD", NeurIPS 2017; Gupta et al., "Deep learning with limited numerical
precision", ICML 2015).

Payload (the layout CUDA kernels reproduce bit for bit; see ``kernels/torch_ops.py``)::

    [codes: ceil(n * bits / 8) bytes, code i at bits i*bits.., LSB first]
    [scales: ceil(n / group) records of fp32 little endian: (lo, step) | (step,)]

so 4-bit, group 128 costs ceil(n/2) + 8 * ceil(n/128) bytes (minmax).

``rotate="hadamard"`` (``group`` a power of two) quantizes a randomized Hadamard transform
of each group instead of the group itself: y_g = H (s * x_g) / (2 group), with H the +-1
Walsh-Hadamard matrix and s random signs derived from the codec's ``seed`` (identical at
both ends, never sent), and decodes x_g' = 2 s * (H y_g'). The transform is orthogonal up
to a scale, so the error bounds above hold for y and carry over to x in L2
(||x' - x|| / ||x|| = ||y' - y|| / ||y||), but a few outliers no longer set the group's
scale: their energy is spread over the whole group (QuaRot; TAH-Quant). A partial last
group of r elements is zero-padded to the next power of two p >= r for the transform, so
the payload holds codes for (G - 1) * group + p elements (n when group divides n); signs,
padding and the exact layout are documented at ``hadamard_rotate`` in
``kernels/torch_ops.py``. The rotation runs in torch on every back-end (the CuPy back-end
quantizes the rotated values with its fused kernel); ``rotate="none"`` (default) is the
plain codec, byte for byte. Measured on a (64, 512) activation with 4 columns 50x larger
(3 seeds): 4-bit minmax nearest 0.255 -> 0.058 relative error, 8-bit 0.0135 -> 0.0034; but
2-bit absmax (grid -1, 0, 1) gets worse, 0.27 -> 0.44, since most of a rotated,
Gaussian-like group rounds to 0 while the outliers alone were exact before.

NaN/Inf: a group holding a NaN or Inf stores NaN scales and decodes entirely as NaN (with
rotation too: the transform mixes only within a group); other groups are unaffected.
Finite inputs: absmax decodes finite values for every finite input; minmax overflows its
step (and decodes the group as non-finite) when a group's range max - min exceeds the fp32
maximum, i.e. values of both signs beyond half of it. With rotation the decoded values
are clamped to the fp32 range.
"""
from __future__ import annotations

from .codec import Codec, check_choice, check_range, register_codec
from .kernels.torch_ops import hadamard_numel, hadamard_rotate, hadamard_unrotate, quant_payload_nbytes

SCHEMES = ("minmax", "absmax")
ROUNDINGS = ("stochastic", "nearest")
ROTATIONS = ("none", "hadamard")


@register_codec("quant")
class Quant(Codec):
    bits: int = 8
    group: int = 128
    scheme: str = "minmax"
    rounding: str = "stochastic"
    rotate: str = "none"

    @property
    def unbiased(self) -> bool:
        return self.rounding == "stochastic"

    @property
    def contractive(self) -> bool:
        """Nearest rounding errs by at most step/2 per element. With minmax,
        ||x_g||^2 >= range^2 / 2 and step = range / L (L = 2^bits - 1), so
        ||C(x) - x||^2 < ||x||^2 holds whenever group < 2 L^2; with absmax,
        ||x_g||^2 >= amax^2 and step/2 = amax / L (L = 2^bits - 2 steps across
        [-amax, amax]), so group < L^2. (Stochastic rounding is unbiased, not contractive.)"""
        L = (1 << self.bits) - 1 if self.scheme == "minmax" else (1 << self.bits) - 2
        bound = 2 * L * L if self.scheme == "minmax" else L * L
        return self.rounding == "nearest" and self.group < bound

    def validate(self):
        check_range(self, "bits", self.bits, 1, 8)
        check_range(self, "group", self.group, 1)
        check_choice(self, "scheme", self.scheme, SCHEMES)
        check_choice(self, "rounding", self.rounding, ROUNDINGS)
        if self.scheme == "absmax" and self.bits == 1:
            raise ValueError(f"{self.name}: bits=1 with scheme=absmax is invalid; allowed: bits=2..8 for absmax "
                             "(a symmetric grid with an exact zero needs 3 points), or scheme=minmax for 1 bit")
        check_choice(self, "rotate", self.rotate, ROTATIONS)
        if self.rotate == "hadamard" and (self.group < 2 or self.group & (self.group - 1)):
            raise ValueError(f"{self.name}: group={self.group} is invalid with rotate=hadamard; allowed: a power "
                             "of two >= 2 (e.g. 64, 128, 256)")

    def _coded_numel(self, numel: int) -> int:
        return hadamard_numel(numel, self.group) if self.rotate == "hadamard" else numel

    def payload_nbytes(self, numel, dtype=None):
        return quant_payload_nbytes(self._coded_numel(numel), self.bits, self.group, self.scheme)

    def encode(self, x, gen):
        stochastic = self.rounding == "stochastic"
        if self.rotate == "hadamard":
            x = hadamard_rotate(x, self.group, self.seed)
        return self.ops(x.device).quantize_pack(x, self.bits, self.group, self.scheme, stochastic, gen)

    def decode(self, payload, numel):
        m = self._coded_numel(numel)
        y = self.ops(payload.device).unpack_dequantize(payload, m, self.bits, self.group, self.scheme)
        return hadamard_unrotate(y, numel, self.group, self.seed) if self.rotate == "hadamard" else y
