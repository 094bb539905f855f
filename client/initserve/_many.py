"""Many tensors on one InitMany stream: the specs, the stream split into each tensor's messages, and
resumption from the first tensor not yet verified (at its last verified byte)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from initserve._codec import StreamAssembler
from initserve._errors import InitServeError, IntegrityError
from initserve._requests import ShapeLike
from initserve._retry import Attempts, RetryPolicy
from initserve_protocol.schemes import ParamValue
from initserve_protocol.slices import Slice
from initserve_protocol.v1 import initserve_pb2 as pb
from initserve_protocol.wire import ChunkView


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of :meth:`Client.fetch_many`: :meth:`Client.fetch`'s arguments, as data.

    ``seed``: None takes the call's base seed; with a seed (either one) the generator's seed is
    ``derive_seed(seed, name)`` unless ``derive=False``. ``out``: a contiguous CPU tensor of the result's
    shape and dtype to write into (a parameter's own storage, say).
    """

    name: str
    shape: ShapeLike
    scheme: str
    params: Mapping[str, ParamValue] = field(default_factory=dict)
    seed: int | None = None
    derive: bool | None = None
    slices: Sequence[Slice] = ()
    dtype: torch.dtype = torch.float32
    out: torch.Tensor | None = None


Message = pb.InitResponse | ChunkView
# (first tensor, its offset, its seed when the server drew it, seconds left) -> (tensor index, message) pairs,
# indices counted from ``first``
OpenMany = Callable[[int, int, int | None, float | None], Iterable[tuple[int, Message]]]


@dataclass
class ManyOutcome:
    attempts: int  # streams opened for the whole call
    resumed_at: list[list[int]]  # per tensor: the offsets that later streams resumed it from


def _is_trailer(message: Message) -> bool:
    return type(message) is not ChunkView and message.WhichOneof("part") == "trailer"


def _messages_of(stream: Iterator[tuple[int, Message]], position: int, first: int) -> Iterator[Message]:
    """Tensor ``position``'s messages from the shared stream, up to and including its trailer."""
    for index, message in stream:
        if first + index != position:
            raise IntegrityError(
                f"InitMany sent a message of tensor {first + index} while tensor {position} was incomplete",
                recovery="resume",
            )
        yield message
        if _is_trailer(message):
            return


def fetch_many_resuming(
    open_many: OpenMany,
    assemblers: Sequence[StreamAssembler],
    policy: RetryPolicy,
    timeout: float | None,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> ManyOutcome:
    """Consume InitMany streams into ``assemblers`` (one per tensor, in order) until every tensor is verified.

    A broken stream is resumed with the tensors not yet verified, the first from its last verified byte (and
    with the seed its first header reported, if the server drew it); the retry budget covers the whole call.
    """
    attempts = Attempts(policy, timeout, sleep)
    resumed_at: list[list[int]] = [[] for _ in assemblers]
    current = 0  # the first tensor not yet verified

    def spent() -> str:
        return f"{attempts.count} InitMany stream(s); {current} of {len(assemblers)} tensors verified"

    while True:
        assembler = assemblers[current] if current < len(assemblers) else None
        remaining = attempts.start(spent)
        offset = assembler.received if assembler is not None else 0
        header = assembler.header if assembler is not None else None
        seed = header.seed_used if header is not None and header.seeded else None
        if attempts.count > 1 and assembler is not None:
            resumed_at[current].append(offset)
        first = current
        stream = iter(open_many(first, offset, seed, remaining))
        try:
            try:
                while current < len(assemblers):
                    assemblers[current].consume(_messages_of(stream, current, first))
                    current += 1
                if next(stream, None) is not None:
                    raise IntegrityError("InitMany sent a message after its last tensor", recovery="none")
            finally:
                if hasattr(stream, "close"):  # a stream's generator: closing it cancels the call
                    stream.close()
            return ManyOutcome(attempts.count, resumed_at)
        except InitServeError as error:
            if isinstance(error, IntegrityError) and error.recovery == "restart":
                assemblers[current].restart()
            attempts.failed(error, spent)
