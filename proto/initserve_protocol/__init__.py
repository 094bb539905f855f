"""initserve's contract, which the server and every client stand on.

``initserve_protocol.v1`` holds the generated stubs of ``proto/initserve/v1/initserve.proto`` (the API: messages,
service, and the semantics in its comments). The modules beside it compute what both sides must agree on, byte for
byte, and are public: another client may be written against them.

- :mod:`~initserve_protocol.schemes`: the scheme table (torch's parameters, their defaults, which are seeded).
- :mod:`~initserve_protocol.dtypes`: the wire dtypes and their torch dtypes.
- :mod:`~initserve_protocol.slices`: slices and shards of a tensor, resolved to ranges.
- :mod:`~initserve_protocol.seeds`: ``derive_seed`` and the name limit.
- :mod:`~initserve_protocol.checksum`: per-chunk CRC-32 and the whole-tensor checksum.
- :mod:`~initserve_protocol.codec`: a tensor's bytes as Header/Chunk*/Trailer, and the header's CRC-32.
- :mod:`~initserve_protocol.wire`: the hand-written Chunk encoding and the unary and InitMany framings.
- :mod:`~initserve_protocol.errors`: the trailing-metadata keys beside a status.
- :mod:`~initserve_protocol.limits`: limits every server and client share.
"""

API_VERSION = "initserve.v1"
