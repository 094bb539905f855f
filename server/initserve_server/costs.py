"""The cost model: the work and working memory a request's generation takes, and refusing what would run too long.

A request's bytes bound its tensor, not its work: ``sparse [0, 2**62]`` is 0 bytes and torch loops over 2**62
columns; ``trunc_normal [1] a=10 b=1e9`` is 4 bytes and torch's rejection loop practically never accepts. Each
scheme's cost is derived from what its torch function does (torch 2.13's ``torch/nn/init.py``, and the server's
``sparse_``), with coefficients measured by ``bench/costs.py`` on the reference machine (docs/limits.md has the
figures and how to recalibrate). ``work_seconds`` is seconds of one core of that machine, under one intra-op
thread and glibc's pinned mmap threshold (every temporary of 8 MiB or more is a fresh mapping whose pages fault
in: that cost is part of the coefficients). Per scheme, with ``n`` elements and ``B`` = the tensor's bytes:

- uniform, normal, constant, ones, zeros, eye, xavier_*, kaiming_*: ``n x`` the fill's seconds per element
  (:data:`FILL_SECONDS_PER_ELEMENT`: uniform_, normal_ or fill_, per dtype); working memory 0.
- dirac: the zero fill plus ``groups x min(out_channels // groups, in_channels)`` diagonal elements, set by
  indexed assignments of at most DIRAC_WRITES_PER_CALL (``initializers.dirac_``; torch's loop set them one Python
  call each, 200x slower) (:data:`DIRAC_SECONDS_PER_WRITE`); working memory: the index tensors of one assignment.
- sparse (``rows x cols``, ``z`` rows zeroed per column): the normal fill plus, per column,
  :data:`SPARSE_SECONDS_PER_COLUMN` ``+ rows x`` :data:`SPARSE_SECONDS_PER_ROW` (``randperm(rows)``; less while
  the permutation fits in cache) ``+ z x`` :data:`SPARSE_SECONDS_PER_ZERO`. A zero-element ``[0, cols]`` still
  pays its ``cols`` iterations. Working memory: one int64 permutation (the compiled loop frees each before
  making the next), ``min(cols, 1) x rows x 8`` bytes.
- orthogonal (``rows x cols`` flattened, QR of ``m x k``, ``m >= k``, transposed when rows < cols):
  ``2mk^2 - 2k^3/3`` flops x :data:`QR_SECONDS_PER_FLOP` ``+ mk x`` :data:`ORTHOGONAL_SECONDS_PER_ELEMENT`
  (the normal fill, QR's memory-bound passes, the sign fix, the copy and the gain). Working memory: the
  flattened normal matrix and Q (``2B``), R (``k^2``) and LAPACK's workspace
  (:data:`QR_WORKSPACE_ELEMENTS_PER_COLUMN` ``x k``), in the tensor's itemsize. float16/bfloat16: torch fills
  the flattened matrix and copies it for LAPACK (``2B``), then its QR raises (not implemented for those dtypes).
- trunc_normal: a rejection sampler whose every round touches the whole tensor; the loop ends when all ``n``
  elements are accepted, so it runs ``max`` of ``n`` geometric(``q``) rounds, ``q`` the per-candidate
  acceptance of the branch torch takes (:func:`trunc_normal_plan`). Rounds are bounded by
  ``ceil(ln n / -ln(1 - q)) + 1/q`` (:func:`expected_rounds`), each costing :data:`TRUNC_NORMAL_SECONDS_PER_ROUND`
  ``+ n x`` :data:`TRUNC_NORMAL_SECONDS_PER_ELEMENT_ROUND`. Working memory, per branch: normal (p > 0.3) the
  previous result, a fresh normal draw, torch.where's output and a bool mask, ``3B + n``; uniform (p <= 0.3)
  candidates, the acceptance buffer, the previous and the new result and the pending mask, ``4B + n``. When
  ``q`` is 1 (``std=0.02`` with the default bounds: 100 std), the first round accepts all and the loop is never
  entered: ``3n`` (the masks) and ``2B + n``.
  ``q == 0`` (or so small that the rounds overflow) is infinite work.

The portable generator (``generator`` "philox4x32-10/v1", drawn schemes) is its own kernel, on one thread, over
the elements it computes (a slice's own, not the whole tensor's): ``n x``
:data:`PORTABLE_SECONDS_PER_ELEMENT` by draw (uniform, normal, trunc_normal; measured on this 2-core VM at
2.2, 4.8 and up to 58 ns, each rounded up), and for sparse, each column's zero positions from the keys of all its
rows, ``rows x`` the slice's columns ``x`` :data:`PORTABLE_SPARSE_SECONDS_PER_KEY` (measured 50 ns with the
values). Working memory: the float32 staging piece of a 16-bit dtype, and sparse's key blocks
(:data:`PORTABLE_SPARSE_WORKING_BYTES`).

Every generation also pays :data:`CALL_SECONDS`. A CUDA generation is estimated at the CPU's figures (the GPU
is faster, so this is conservative) and takes no host working memory beyond the host copy of its tensor, which
the byte budgets already count: the GPU holds the temporaries.

Where torch raises on a request, the client gets torch's own error (the contract), so :func:`check` refuses only
requests torch would accept: before refusing, it dry-runs torch's validation (:func:`torch_error`), which costs
nothing, and lets a request torch rejects through, to fail quickly with torch's message. :func:`estimate` alone
describes the work torch would do if it accepted the request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from initserve_server import torch_warnings
from initserve_server.initializers import DIRAC_WRITES_PER_CALL, INITIALIZERS
from initserve_server.spec import InitSpec
from initserve_server.validation import InvalidRequest

# --- coefficients: bench/costs.py measures them on the reference machine; docs/limits.md has the figures ---------

# Each is about 1.5 x the smallest of repeated measurements: on a shared machine the same fill measures slower
# from one minute to the next, and a refusal should not hinge on that noise.
# A generation's fixed cost: the Python call, the generator, the tensor's header.
CALL_SECONDS = 50e-6
# One fill of a fresh tensor (its pages fault in), seconds per element, by torch method and dtype.
FILL_SECONDS_PER_ELEMENT: dict[tuple[str, str], float] = {
    ("uniform", "float32"): 8e-9,
    ("uniform", "float64"): 12e-9,
    ("uniform", "float16"): 7e-9,
    ("uniform", "bfloat16"): 8e-9,
    ("normal", "float32"): 8e-9,
    ("normal", "float64"): 32e-9,
    ("normal", "float16"): 7e-9,
    ("normal", "bfloat16"): 9e-9,
    ("fill", "float32"): 3e-9,
    ("fill", "float64"): 5.5e-9,
    ("fill", "float16"): 1.5e-9,
    ("fill", "bfloat16"): 1.5e-9,
}
# One round of trunc_normal_'s rejection loop, seconds per element, by branch and dtype; and per round, whatever
# the size (about ten torch calls from Python).
TRUNC_NORMAL_SECONDS_PER_ELEMENT_ROUND: dict[tuple[str, str], float] = {
    ("normal", "float32"): 16e-9,
    ("normal", "float64"): 40e-9,
    ("normal", "float16"): 16e-9,
    ("normal", "bfloat16"): 16e-9,
    ("uniform", "float32"): 26e-9,
    ("uniform", "float64"): 34e-9,
    ("uniform", "float16"): 26e-9,
    ("uniform", "bfloat16"): 26e-9,
}
TRUNC_NORMAL_SECONDS_PER_ROUND = 60e-6
# Householder QR (torch.linalg.qr, reduced, one thread), seconds per flop counted as 2mk^2 - 2k^3/3; it covers
# forming Q too. The rate is the slowest of squares from 1024 up and of a tall 64Ki x 1024 (tall ones are slower
# per flop: their panels are memory-bound; large squares are faster). Only float32 and float64: torch's CPU QR
# does not implement the half types.
QR_SECONDS_PER_FLOP: dict[str, float] = {"float32": 65e-12, "float64": 100e-12}
# orthogonal_'s element-linear part, seconds per element of the flattened matrix: the normal fill, QR's
# memory-bound passes (all of a thin QR), the sign fix, the copy and the gain. For the half types: the fill and
# QR's column-major copy, after which the QR raises.
ORTHOGONAL_SECONDS_PER_ELEMENT: dict[str, float] = {
    "float32": 32e-9,
    "float64": 70e-9,
    "float16": 32e-9,
    "bfloat16": 32e-9,
}
SPARSE_SECONDS_PER_COLUMN = 8e-6  # randperm and index_put of one column in the compiled loop (5.4 us measured)
# randperm(rows), per row, per column: Fisher-Yates swaps at random, so the cost per row is the latency of the
# memory the permutation lives in: a cache-resident one (up to SPARSE_CACHED_PERMUTATION_BYTES) or DRAM.
SPARSE_SECONDS_PER_ROW_CACHED = 12e-9
SPARSE_SECONDS_PER_ROW = 60e-9
SPARSE_CACHED_PERMUTATION_BYTES = 1 << 20  # a core's L2 on the reference machine
SPARSE_SECONDS_PER_ZERO = 60e-9  # one zeroed element, per column: a scattered write into the tensor
DIRAC_SECONDS_PER_WRITE = 30e-9  # one diagonal element of initializers.dirac_'s indexed assignments (20 ns measured)
# dirac's index tensors per assignment (int64 rows, columns and their sum), at most DIRAC_WRITES_PER_CALL writes
DIRAC_INDEX_BYTES_PER_WRITE = 32

# --- working memory --------------------------------------------------------------------------------------------

RANDPERM_ITEMSIZE = 8  # torch.randperm makes int64
BOOL_ITEMSIZE = 1
# torch.linalg.qr's small allocations beyond Q and R: LAPACK's blocked workspace (k x nb elements, nb its block
# size), tau, and the buffers MKL keeps between calls.
QR_WORKSPACE_ELEMENTS_PER_COLUMN = 2048
QR_DTYPES = frozenset({"float32", "float64"})

# --- trunc_normal's acceptance ---------------------------------------------------------------------------------

# trunc_normal_'s uniform branch accepts a candidate when log(u) <= its log-pdf; u == 0 (log -inf) always
# accepts. uniform_() draws exactly 0 with this probability: 24 and 53 random bits for float32 and float64;
# float16 and bfloat16 map the draws that round up to 1 onto 0 (half an ulp below 1: 2^-12 and 2^-9). Lower
# bounds of the acceptance: in the half types a candidate also lands on a bound (maybe the mode) as often.
EXACT_ZERO_PROBABILITY: dict[str, float] = {
    "float32": 2.0**-24,
    "float64": 2.0**-53,
    "float16": 2.0**-12,
    "bfloat16": 2.0**-9,
}
TRUNC_NORMAL_NORMAL_BRANCH_ABOVE = 0.3  # torch redraws normals when the interval's mass p exceeds this

# A generation at most this long may take the reserved lane: a [4, 4] and a 1 MiB normal are far below it, a
# 256 MiB one far above.
LIGHT_WORK_SECONDS = 0.010


@dataclass(frozen=True)
class Cost:
    """What generating one tensor costs on the CPU: one core's time and the host memory beyond the tensor."""

    work_seconds: float  # estimated seconds of ONE core of the reference machine to generate the tensor
    working_bytes: int  # peak host memory the generation uses BEYOND the tensor's own bytes
    explain: str  # human-readable breakdown, e.g. "sparse: 4611686018427387904 columns x 6.1 us"

    @property
    def light(self) -> bool:
        """A small generation: it may use the reserved lane."""
        return self.work_seconds <= LIGHT_WORK_SECONDS


class WorkRefused(InvalidRequest):
    """The request's generation is estimated above the server's max_work_seconds (INVALID_ARGUMENT)."""

    def __init__(self, message: str, cost: Cost, limit_seconds: float) -> None:
        super().__init__(message)
        self.cost = cost
        self.limit_seconds = limit_seconds


def check(spec: InitSpec, max_work_seconds: float) -> Cost:
    """``spec``'s cost; WorkRefused if torch would accept it and its estimated work exceeds ``max_work_seconds``.

    A request torch rejects is never refused here: its generation raises torch's error at once, and the returned
    cost says so.
    """
    cost = estimate(spec)
    if cost.work_seconds <= max_work_seconds:
        return cost
    error = torch_error(spec)
    if error is not None:
        return Cost(CALL_SECONDS, 0, f"{spec.scheme.name}: torch rejects the request ({error})")
    raise WorkRefused(
        f"{spec.scheme.name} {list(spec.shape)} {spec.dtype.name}: the generation is estimated at "
        f"{cost.work_seconds:.3g} s of one core ({cost.explain}); the limit is {max_work_seconds:g} s "
        f"(max_work_seconds)",
        cost,
        max_work_seconds,
    )


def estimate(spec: InitSpec) -> Cost:
    """The cost of generating ``spec``'s whole tensor (its shape, dtype, parameters and device; a portable slice's
    own elements), assuming torch accepts the request. Never raises: a value torch would reject gives some finite
    or infinite estimate."""
    cost = _portable(spec) if spec.direct else _ESTIMATORS[spec.scheme.name](spec)
    if spec.device.type == "cuda":  # the GPU holds the temporaries; its time is bounded by the CPU's
        return Cost(cost.work_seconds, 0, cost.explain + "; on the GPU: no host working memory")
    return cost


# --- per scheme -----------------------------------------------------------------------------------------------


def _param(spec: InitSpec, name: str) -> object:
    """The request's value of ``name``, or torch's default."""
    for given, value in spec.params:
        if given == name:
            return value
    return spec.scheme.param(name).default


def _seconds(value: float) -> str:
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    if value >= 1e-6:
        return f"{value * 1e6:.3g} us"
    if value >= 1e-9:
        return f"{value * 1e9:.3g} ns"
    return f"{value * 1e12:.3g} ps"


_FILL_METHOD = {
    "uniform": "uniform",
    "xavier_uniform": "uniform",
    "kaiming_uniform": "uniform",
    "normal": "normal",
    "xavier_normal": "normal",
    "kaiming_normal": "normal",
    "constant": "fill",
    "ones": "fill",
    "zeros": "fill",
    "eye": "fill",
}


def _fill(spec: InitSpec) -> Cost:
    elements = math.prod(spec.shape)
    per_element = FILL_SECONDS_PER_ELEMENT[(_FILL_METHOD[spec.scheme.name], spec.dtype.name)]
    return Cost(
        CALL_SECONDS + elements * per_element,
        0,
        f"{spec.scheme.name}: {elements} elements x {_seconds(per_element)}",
    )


PORTABLE_SECONDS_PER_ELEMENT = {"uniform": 3e-9, "normal": 6e-9, "trunc_normal": 80e-9, "sparse": 6e-9}
PORTABLE_SPARSE_SECONDS_PER_KEY = 70e-9
_PORTABLE_DRAW = {"xavier_uniform": "uniform", "kaiming_uniform": "uniform", "xavier_normal": "normal",
                  "kaiming_normal": "normal"} | {name: name for name in PORTABLE_SECONDS_PER_ELEMENT}  # fmt: skip
PORTABLE_SPARSE_WORKING_BYTES = 32 << 20  # key blocks of about 2**20 (key, row) pairs, and the thresholds kept


def _portable(spec: InitSpec) -> Cost:
    """The portable kernel over the elements a (slice's) generation computes."""
    from initserve_protocol.portable import tensors as portable_tensors  # Numba: loaded by the first portable request

    elements = math.prod(spec.out_shape)
    per_element = PORTABLE_SECONDS_PER_ELEMENT[_PORTABLE_DRAW[spec.scheme.name]]
    seconds = CALL_SECONDS + elements * per_element
    working = min(elements, portable_tensors.STAGING_ELEMENTS) * 4 if spec.dtype.itemsize == 2 else 0
    explain = f"{spec.scheme.name} (portable): {elements} elements x {_seconds(per_element)}"
    if spec.scheme.name == "sparse" and len(spec.shape) == 2:
        keys = spec.shape[0] * spec.out_shape[1]
        seconds += keys * PORTABLE_SPARSE_SECONDS_PER_KEY
        working += PORTABLE_SPARSE_WORKING_BYTES
        explain += f" + {keys} keys x {_seconds(PORTABLE_SPARSE_SECONDS_PER_KEY)}"
    return Cost(seconds, working, explain)


def _dirac(spec: InitSpec) -> Cost:
    elements = math.prod(spec.shape)
    groups = _param(spec, "groups")
    writes = 0
    if len(spec.shape) in (3, 4, 5) and groups > 0:  # otherwise torch raises, or range(groups) is empty
        writes = groups * max(0, min(spec.shape[0] // groups, spec.shape[1]))
    zero_fill = FILL_SECONDS_PER_ELEMENT[("fill", spec.dtype.name)]
    return Cost(
        CALL_SECONDS + elements * zero_fill + writes * DIRAC_SECONDS_PER_WRITE,
        min(writes, DIRAC_WRITES_PER_CALL) * DIRAC_INDEX_BYTES_PER_WRITE,
        f"dirac: {writes} diagonal writes x {_seconds(DIRAC_SECONDS_PER_WRITE)} "
        f"+ {elements} elements x {_seconds(zero_fill)}",
    )


def _sparse(spec: InitSpec) -> Cost:
    if len(spec.shape) != 2:  # torch raises
        return Cost(CALL_SECONDS, 0, "sparse: not 2-dimensional")
    rows, cols = spec.shape
    sparsity = _param(spec, "sparsity")
    if not math.isfinite(sparsity * rows):  # math.ceil raises before the loop
        return Cost(CALL_SECONDS, 0, "sparse: non-finite number of zeros")
    # sparse_ zeroes row_indices[:ceil(sparsity * rows)] of each column: slicing clamps (and counts from the end
    # when negative).
    zeros = len(range(rows)[: math.ceil(sparsity * rows)])
    fill = FILL_SECONDS_PER_ELEMENT[("normal", spec.dtype.name)]
    cached = rows * RANDPERM_ITEMSIZE <= SPARSE_CACHED_PERMUTATION_BYTES
    per_row = SPARSE_SECONDS_PER_ROW_CACHED if cached else SPARSE_SECONDS_PER_ROW
    per_column = SPARSE_SECONDS_PER_COLUMN + rows * per_row + zeros * SPARSE_SECONDS_PER_ZERO
    return Cost(
        CALL_SECONDS + rows * cols * fill + cols * per_column,
        min(cols, 1) * rows * RANDPERM_ITEMSIZE,
        f"sparse: {cols} columns x ({_seconds(SPARSE_SECONDS_PER_COLUMN)} + {rows} rows x "
        f"{_seconds(per_row)} + {zeros} zeros x {_seconds(SPARSE_SECONDS_PER_ZERO)}) "
        f"+ {rows * cols} elements x {_seconds(fill)}",
    )


def qr_flops(rows: int, cols: int) -> float:
    """Householder QR of the flattened ``rows x cols`` matrix (transposed when wide): ``2mk^2 - 2k^3/3``."""
    m, k = max(rows, cols), min(rows, cols)
    return 2.0 * m * k * k - 2.0 * k**3 / 3.0


def _orthogonal(spec: InitSpec) -> Cost:
    elements = math.prod(spec.shape)
    if len(spec.shape) < 2 or elements == 0:  # torch raises, or returns at once
        return Cost(CALL_SECONDS, 0, "orthogonal: nothing to do")
    rows = spec.shape[0]
    cols = elements // rows
    itemsize = spec.dtype.itemsize
    matrix_bytes = elements * itemsize
    per_element = ORTHOGONAL_SECONDS_PER_ELEMENT[spec.dtype.name]
    if spec.dtype.name not in QR_DTYPES:  # the normal fill and QR's column-major copy, then the QR raises
        return Cost(
            CALL_SECONDS + elements * per_element,
            2 * matrix_bytes,
            f"orthogonal: {elements} elements x {_seconds(per_element)}, then torch's QR rejects {spec.dtype.name}",
        )
    k = min(rows, cols)
    flops = qr_flops(rows, cols)
    per_flop = QR_SECONDS_PER_FLOP[spec.dtype.name]
    return Cost(
        CALL_SECONDS + flops * per_flop + elements * per_element,
        2 * matrix_bytes + (k * k + QR_WORKSPACE_ELEMENTS_PER_COLUMN * k) * itemsize,
        f"orthogonal: QR of {max(rows, cols)}x{k}, {flops:.3g} flops x {_seconds(per_flop)} "
        f"+ {elements} elements x {_seconds(per_element)}",
    )


def _norm_cdf(x: float) -> float:
    return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0  # exactly torch's, so the branch is torch's


def _erfcx(x: float) -> float:
    """exp(x^2) erfc(x) for x >= 0, without overflow (the Mills-ratio asymptotic series past 25)."""
    if x < 25.0:
        return math.exp(x * x) * math.erfc(x)
    inverse_square = 1.0 / (x * x)  # x * x overflows to inf, never raises
    series = 1.0 - 0.5 * inverse_square + 0.75 * inverse_square**2 - 1.875 * inverse_square**3
    return series / (x * math.sqrt(math.pi))


def _tail_mean(alpha: float, width: float) -> float:
    """The mean of exp(-(z^2 - alpha^2)/2) over z in [alpha, alpha + width], alpha > 0: the acceptance of a
    uniform candidate when the interval lies right of the mean (its peak is at alpha)."""
    exponent = alpha * width + 0.5 * width * width  # the integrand falls from 1 to exp(-exponent)
    if exponent <= 0.5:  # nearly flat: Simpson's rule on 16 intervals is exact to ~1e-9
        steps = 16
        total = 0.0
        for step in range(steps + 1):
            t = width * step / steps
            weight = 1 if step in (0, steps) else (4 if step % 2 else 2)
            total += weight * math.exp(-alpha * t - 0.5 * t * t)
        return total / (3 * steps)
    # exp(alpha^2/2) * integral of exp(-z^2/2) = sqrt(pi/2) [erfcx(a') - exp(-exponent) erfcx(b')], no cancellation
    # since exp(-exponent) < 0.61 and erfcx falls.
    scaled = _erfcx(alpha / math.sqrt(2.0)) - math.exp(-exponent) * _erfcx((alpha + width) / math.sqrt(2.0))
    return math.sqrt(math.pi / 2.0) * scaled / width


def uniform_acceptance(mean: float, std: float, a: float, b: float) -> float:
    """The probability that one candidate of trunc_normal_'s uniform branch is accepted (ignoring u == 0).

    A candidate x ~ U(a, b) is kept when log(u) <= log_pdf(x) - log_peak, ``log_peak`` the log-density at torch's
    ``mode = max(a, min(mean, b))``: q = std sqrt(2 pi) (Phi(beta) - Phi(alpha)) / ((b - a) exp(log_peak)),
    alpha and beta the standardized bounds, computed in scaled form so that far tails neither underflow nor
    divide by zero (a=10, b=1e9: q = 1e-10).
    """
    if not (math.isfinite(mean) and math.isfinite(std)):
        return 1.0  # torch's test then compares with NaN (or -0.0) and accepts every candidate at once
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        return 0.0  # uniform_ refuses these bounds (torch raises; the estimate is moot)
    scale = abs(std)  # a negative std enters squared: the same acceptance as |std|
    alpha, beta = (a - mean) / scale, (b - mean) / scale
    if beta < 0:  # left of the mean: mirror it
        alpha, beta = -beta, -alpha
    width = beta - alpha
    if not math.isfinite(width):
        return 0.0
    if width == 0:
        return 1.0  # every candidate is the mode
    if alpha <= 0:  # the mean is inside: peak 1 at z = 0, no cancellation between opposite signs
        mass = math.sqrt(math.pi / 2.0) * (math.erf(beta / math.sqrt(2.0)) - math.erf(alpha / math.sqrt(2.0)))
        return min(1.0, mass / width)
    return min(1.0, _tail_mean(alpha, width))


def trunc_normal_plan(mean: float, std: float, a: float, b: float, dtype_name: str) -> tuple[str, float]:
    """(branch, q): the branch torch 2.13's trunc_normal_ takes ("normal" when the interval's mass p > 0.3,
    redrawing normals; "uniform" otherwise) and the probability that one candidate is accepted."""
    if std == 0:
        return "uniform", 1.0  # torch's norm_cdf divides by zero: it raises before any work
    p = _norm_cdf((b - mean) / std) - _norm_cdf((a - mean) / std)
    if p > TRUNC_NORMAL_NORMAL_BRANCH_ABOVE:
        return "normal", p
    return "uniform", max(uniform_acceptance(mean, std, a, b), EXACT_ZERO_PROBABILITY[dtype_name])


def expected_rounds(elements: int, q: float) -> float:
    """An upper bound of E[max of ``elements`` geometric(q) trials]: ceil(ln n / -ln(1 - q)) + 1/q.

    E[max] = sum over k of P(max > k) <= k0 + sum over k >= k0 of n (1-q)^k = k0 + n (1-q)^k0 / q, and
    n (1-q)^k0 <= 1 at k0 = ceil(ln n / -ln(1-q)). An empty tensor takes one (empty) round.
    """
    if elements == 0 or q >= 1:
        return 1.0
    if not q > 0:
        return math.inf
    rounds_all_accepted = math.log(elements) / -math.log1p(-q)
    if not math.isfinite(rounds_all_accepted):
        return math.inf
    return math.ceil(rounds_all_accepted) + 1.0 / q


def trunc_normal_arguments(spec: InitSpec) -> tuple[float, float, float, float]:
    """(mean, std, a, b) as trunc_normal_ receives them: the request's values, or torch's defaults."""
    return tuple(float(_param(spec, name)) for name in ("mean", "std", "a", "b"))


def _trunc_normal_working_bytes(branch: str, elements: int, tensor_bytes: int, rounds: float) -> int:
    """Peak temporaries of torch's loop. A first round that accepts everything never enters the loop: the normal
    branch then holds only its bool masks, the uniform branch its candidates, acceptance buffer and mask."""
    masks = elements * BOOL_ITEMSIZE
    if branch == "normal":
        return 3 * masks if rounds <= 1 else 3 * tensor_bytes + masks
    return 2 * tensor_bytes + masks if rounds <= 1 else 4 * tensor_bytes + masks


def _trunc_normal(spec: InitSpec) -> Cost:
    elements = math.prod(spec.shape)
    branch, q = trunc_normal_plan(*trunc_normal_arguments(spec), spec.dtype.name)
    rounds = expected_rounds(elements, q)
    per_element = TRUNC_NORMAL_SECONDS_PER_ELEMENT_ROUND[(branch, spec.dtype.name)]
    work = CALL_SECONDS + rounds * (TRUNC_NORMAL_SECONDS_PER_ROUND + elements * per_element)
    working = _trunc_normal_working_bytes(branch, elements, elements * spec.dtype.itemsize, rounds)
    return Cost(
        work,
        working,
        f"trunc_normal: {branch} branch, acceptance {q:.3g}, {rounds:.4g} rounds x "
        f"({_seconds(TRUNC_NORMAL_SECONDS_PER_ROUND)} + {elements} elements x {_seconds(per_element)})",
    )


_ESTIMATORS = {
    **{name: _fill for name in _FILL_METHOD},
    "dirac": _dirac,
    "sparse": _sparse,
    "orthogonal": _orthogonal,
    "trunc_normal": _trunc_normal,
}


# --- torch's own validation -----------------------------------------------------------------------------------


class _ValidatedFills(torch.Tensor):
    """A meta tensor for dry runs whose fills are checked, not made: each runs on an empty CPU tensor of the same
    dtype, where torch validates the bounds, std or value (meta tensors skip those checks) and writes nothing."""

    def uniform_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(0, dtype=self.dtype).uniform_(*args, **kwargs)
        return self

    def normal_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(0, dtype=self.dtype).normal_(*args, **kwargs)
        return self

    def fill_(self, *args: object, **kwargs: object) -> torch.Tensor:
        torch.empty(0, dtype=self.dtype).fill_(*args, **kwargs)
        return self


def torch_error(spec: InitSpec) -> str | None:
    """The error torch raises on ``spec`` before its expensive work (``"Type: message"``), or None if it accepts.

    A dry run that does no work: torch's own function on a meta tensor of the request's shape (dims, fans,
    groups, modes, nonlinearities), its fills replayed on empty CPU tensors (bounds, std, values); then what
    torch checks after its meta early return: trunc_normal_ on an empty tensor of the dtype (its checks do not
    depend on the shape), sparse_'s zero count and normal fill, dirac_'s first diagonal write (an empty spatial
    dim raises IndexError there) and orthogonal_'s QR dtype.
    """
    dtype = spec.dtype.torch_dtype
    kwargs = spec.kwargs()
    name = spec.scheme.name
    with torch_warnings.collecting():  # the generation's warnings are the caller's; a dry run's are nobody's
        return _torch_error(spec, dtype, kwargs, name)


def _torch_error(spec: InitSpec, dtype: torch.dtype, kwargs: dict, name: str) -> str | None:
    try:
        meta = torch.empty(spec.shape, dtype=dtype, device="meta")
        if name == "trunc_normal":
            torch.nn.init.trunc_normal_(torch.empty(0, dtype=dtype), **kwargs)
        elif name == "sparse":
            torch.nn.init.sparse_(meta, **kwargs)  # the dims; it returns before anything else on meta
            math.ceil(_param(spec, "sparsity") * spec.shape[0])  # the server's sparse_, in its order
            torch.empty(0, dtype=dtype).normal_(0, _param(spec, "std"))
        elif name == "orthogonal":
            torch.nn.init.orthogonal_(meta, **kwargs)
            if meta.numel():
                torch.linalg.qr(torch.empty(1, 1, dtype=dtype))
        elif name == "dirac":
            torch.nn.init.dirac_(meta, **kwargs)
            groups = _param(spec, "groups")
            if groups > 0 and min(spec.shape[0] // groups, spec.shape[1]) > 0:
                meta[(0, 0, *(size // 2 for size in spec.shape[2:]))] = 1
        else:
            INITIALIZERS[name](meta.as_subclass(_ValidatedFills), **kwargs)
    except Exception as error:  # noqa: BLE001 - whatever torch raises, the generation raises too
        return f"{type(error).__name__}: {error}"
    return None
