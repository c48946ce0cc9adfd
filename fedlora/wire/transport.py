"""Tensors on the wire: a float dtype, or per-block absmax int8 / NF4 codes, decoded to float32.

``federation.transport_dtype`` names the float type on the wire (``float32``, ``float16``,
``bfloat16``) and ``federation.transport_quantize`` whether factors go as codes instead:

* ``int8``: each block of :data:`BLOCKS` ``["int8"]`` consecutive values (row-major) is divided
  by ``absmax / 127`` and rounded to the nearest integer in [-127, 127], so every value is off
  by at most ``absmax / 254``;
* ``nf4``: QLoRA's 4-bit NormalFloat code on blocks of :data:`BLOCKS` ``["nf4"]``, through
  bitsandbytes' ``quantize_4bit`` (it runs on the CPU): off by at most half the widest gap of
  the code (0.152) times the block's absmax.

int8 is plain rounding rather than a library call on purpose: bitsandbytes' blockwise 8-bit
quantizer does not always pick the nearest level (measured: 1.002 x the half step) and torch's
``quantize_per_channel`` is deprecated as of torch 2.13. The per-block scales travel in the
transport dtype. Whatever travels, both ends compute in float32: :func:`decode`
returns float32 and aggregation never sees a code.

An encoded tensor is one Flower :class:`~flwr.app.Array` whose ``stype`` names the encoding and
whose ``data`` is the scales followed by the codes; :func:`decode` checks that the bytes are
exactly what the declared shape needs before it uses them, so a reply that lies about its
shape or size is refused, never reshaped.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedlora.config import TRANSPORT_DTYPES, TRANSPORT_QUANTIZERS

#: Values per absmax block. 256 keeps int8's scales at 1/64 of its codes (<= 0.254 x float32);
#: NF4 uses QLoRA's 64 (<= 0.141 x float32 with float32 scales).
BLOCKS = {"int8": 256, "nf4": 64}
#: ``Array.stype`` of each encoding; numpy arrays keep Flower's own ``numpy.ndarray``.
STYPES = {"int8": "fedlora.int8", "nf4": "fedlora.nf4", "bfloat16": "fedlora.bfloat16"}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SCALE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


#: The one key of a packed record (:meth:`Wire.pack`): every tensor of a message in one Array.
PACKED = "fedlora.packed"
#: A packed record's index: at most this many bytes, compressed (keys, dtypes, shapes, sizes).
MAX_INDEX_BYTES = 1 << 20


class WireError(ValueError):
    """An array whose bytes do not decode to what it declares (one line)."""


def _bnb():
    import bitsandbytes.functional as bnbf  # imported on first use: the float path never needs it

    return bnbf


def _nf4_code() -> torch.Tensor:
    return _bnb().get_4bit_type("nf4", device="cpu")


def error_bound(tensor: torch.Tensor, quantize: str) -> torch.Tensor:
    """Per-element bound on ``|decode(encode(t)) - t|`` that absmax quantization guarantees
    (float32 scales), shaped like ``tensor``."""
    flat = tensor.detach().to(torch.float32).reshape(-1)
    if quantize == "none" or flat.numel() == 0:
        return torch.zeros_like(tensor, dtype=torch.float32)
    half_gap = 1 / 254 if quantize == "int8" else float(torch.diff(_nf4_code()).max()) / 2
    block = BLOCKS[quantize]
    pad = (-flat.numel()) % block
    absmax = torch.nn.functional.pad(flat.abs(), (0, pad)).reshape(-1, block).amax(dim=1)
    per_value = absmax.repeat_interleave(block)[: flat.numel()] * half_gap
    return per_value.reshape(tensor.shape)


def encode(tensor: torch.Tensor, dtype: str = "float32", quantize: str = "none") -> Array:
    """One tensor as a Flower Array: ``dtype`` floats, or ``quantize`` codes with ``dtype`` scales."""
    t = tensor.detach().to("cpu", torch.float32).contiguous()
    shape = tuple(int(s) for s in t.shape)
    if quantize == "none":
        if dtype == "bfloat16":  # numpy has no bfloat16: its raw bytes
            raw = t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            return Array(dtype="bfloat16", shape=shape, stype=STYPES["bfloat16"], data=raw)
        return Array(np.ascontiguousarray(t.numpy().astype(np.dtype(dtype), copy=False)))
    if quantize == "int8":
        block = BLOCKS["int8"]
        flat = t.reshape(-1)
        blocks = torch.nn.functional.pad(flat, (0, (-flat.numel()) % block)).reshape(-1, block)
        scales = blocks.abs().amax(dim=1) / 127
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = (blocks / safe[:, None]).round().clamp(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
    elif quantize == "nf4":
        codes, state = _bnb().quantize_4bit(t.reshape(-1), blocksize=BLOCKS["nf4"], quant_type="nf4")
        scales = state.absmax
    else:
        raise ValueError(f"unknown quantizer {quantize!r}")
    scales = scales.to(torch.float32).to(_TORCH[dtype])
    if dtype == "bfloat16":
        scales = scales.view(torch.int16)
    data = scales.contiguous().numpy().tobytes() + codes.contiguous().numpy().tobytes()
    return Array(dtype=dtype, shape=shape, stype=STYPES[quantize], data=data)


def _layout(quantize: str, dtype: str, numel: int) -> tuple[int, int]:
    """(scale bytes, code bytes) an encoded tensor of ``numel`` values must have."""
    blocks = -(-numel // BLOCKS[quantize])
    codes = numel if quantize == "int8" else (numel + 1) // 2
    return blocks * _SCALE_BYTES[dtype], codes


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, Fortran order) of an ``.npy`` header, parsed by numpy once per distinct
    header: a federation sends the same few shapes every round, and numpy's parser (a Python
    literal_eval per tensor) was most of what decoding a small adapter cost."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if stream.tell() != len(header):
        raise ValueError("header length")
    return dtype, tuple(shape), bool(fortran)


def _npy_values(data: bytes) -> np.ndarray:
    """The array an ``.npy`` byte string holds (what Flower's ``Array.numpy`` returns), read
    without copying its data; ValueError when the bytes are not one."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not an npy array")
    size = 2 if data[6] == 1 else 4  # header length field: 2 bytes in format 1.0, 4 in 2.0/3.0
    offset = 8 + size + int.from_bytes(data[8 : 8 + size], "little")
    dtype, shape, fortran = _npy_header(bytes(data[:offset]))
    if dtype.hasobject:
        raise ValueError("object array")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError("data length")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")


def _decode_numpy(array: Array, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of a plain numpy Array, which must hold a float transport dtype of ``shape``."""
    try:
        values = _npy_values(array.data)
    except Exception as err:  # noqa: BLE001 - undecodable bytes from a faulty peer
        raise WireError(f"undecodable array ({type(err).__name__})") from None
    if tuple(values.shape) != shape:
        raise WireError(f"bytes decode to shape {tuple(values.shape)}, declared {shape}")
    dtype = array.dtype
    if values.dtype.kind != "f" or str(values.dtype) != dtype or dtype not in TRANSPORT_DTYPES:
        raise WireError(f"bytes decode to {values.dtype}, declared {dtype}")
    return torch.from_numpy(np.array(values, dtype=np.float32, copy=True))


def decode(array: Array) -> torch.Tensor:
    """float32 tensor of an encoded Array; :class:`WireError` when its bytes do not fit its header."""
    try:
        shape = tuple(int(s) for s in array.shape)
    except (TypeError, ValueError):
        raise WireError(f"malformed shape {array.shape!r}") from None
    if any(s < 0 for s in shape):
        raise WireError(f"negative dimension in shape {shape}")
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if numel == 0:
        if len(array.data) > 128:  # an empty tensor's numpy header at most
            raise WireError(f"{len(array.data)} bytes for an empty tensor")
        return torch.zeros(shape)
    stype, dtype, data = array.stype, array.dtype, array.data
    if stype == "numpy.ndarray":
        return _decode_numpy(array, shape)
    if dtype not in TRANSPORT_DTYPES:
        raise WireError(f"unknown dtype {dtype!r}")
    if stype == STYPES["bfloat16"]:
        if dtype != "bfloat16" or len(data) != 2 * numel:
            raise WireError(f"{len(data)} bytes for {numel} bfloat16 values")
        return torch.frombuffer(bytearray(data), dtype=torch.bfloat16).to(torch.float32).reshape(shape)
    quantize = next((q for q, s in STYPES.items() if s == stype and q in BLOCKS), None)
    if quantize is None:
        raise WireError(f"unknown encoding {stype!r}")
    scale_bytes, code_bytes = _layout(quantize, dtype, numel)
    if len(data) != scale_bytes + code_bytes:
        raise WireError(f"{len(data)} bytes for {numel} {quantize} values, expected {scale_bytes + code_bytes}")
    raw = bytearray(data)
    scales = torch.frombuffer(
        raw, dtype=torch.int16 if dtype == "bfloat16" else _TORCH[dtype], count=scale_bytes // _SCALE_BYTES[dtype]
    )
    if dtype == "bfloat16":
        scales = scales.view(torch.bfloat16)
    scales = scales.to(torch.float32)
    if not torch.isfinite(scales).all():
        raise WireError("non-finite scales")
    if quantize == "int8":
        codes = torch.frombuffer(raw, dtype=torch.int8, offset=scale_bytes).to(torch.float32)
        values = codes * scales.repeat_interleave(BLOCKS["int8"])[:numel]
    else:
        bnbf = _bnb()
        codes = torch.frombuffer(raw, dtype=torch.uint8, offset=scale_bytes)
        state = bnbf.QuantState(
            absmax=scales,
            shape=torch.Size([numel]),
            code=_nf4_code(),
            blocksize=BLOCKS["nf4"],
            quant_type="nf4",
            dtype=torch.float32,
        )
        values = bnbf.dequantize_4bit(codes.reshape(-1, 1), state)
    return values.to(torch.float32).reshape(shape).clone()


@dataclass(frozen=True)
class Wire:
    """How tensors travel in a run: ``federation.transport_dtype`` and ``transport_quantize``."""

    dtype: str = "float32"
    quantize: str = "none"

    def __post_init__(self) -> None:
        if self.dtype not in TRANSPORT_DTYPES:
            raise ValueError(f"transport dtype must be one of {', '.join(TRANSPORT_DTYPES)}, got {self.dtype!r}")
        if self.quantize not in TRANSPORT_QUANTIZERS:
            raise ValueError(
                f"transport quantizer must be one of {', '.join(TRANSPORT_QUANTIZERS)}, got {self.quantize!r}"
            )

    @property
    def lossy(self) -> bool:
        return self.dtype != "float32" or self.quantize != "none"

    def stype(self) -> str:
        """The ``Array.stype`` a tensor of this wire has."""
        if self.quantize != "none":
            return STYPES[self.quantize]
        return STYPES["bfloat16"] if self.dtype == "bfloat16" else "numpy.ndarray"

    def to_record(
        self, state: Mapping[str, torch.Tensor], exact: Callable[[str], bool] = lambda key: False, packed: bool = False
    ) -> ArrayRecord:
        """ArrayRecord of ``state`` (keys sorted; in one Array when ``packed``, as messages are);
        keys for which ``exact`` holds go as float32."""
        arrays = {
            key: encode(state[key]) if exact(key) else encode(state[key], self.dtype, self.quantize)
            for key in sorted(state)
        }
        return ArrayRecord({PACKED: pack(arrays)}) if packed else ArrayRecord(arrays)


def _relative(key: str, value: torch.Tensor, reference: Mapping[str, torch.Tensor]) -> bool:
    return key in reference and tuple(reference[key].shape) == tuple(value.shape)


def encode_update(
    trained: Mapping[str, torch.Tensor],
    received: Mapping[str, torch.Tensor],
    wire: Wire,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[ArrayRecord, dict[str, torch.Tensor]]:
    """A node's upload: on a lossy wire, each trained tensor minus what the node received for that
    key (same shape), plus last upload's rounding ``residual`` when error feedback is on.

    Rounding what changed instead of the values keeps the error proportional to the update, not
    to the factor; the server adds the decoded difference to the float32 tensor it sent
    (:func:`decode_update`), so the downlink's rounding never enters the global adapter.

    Returns
    -------
    (ArrayRecord, dict)
        The record to send and the new residual (what was meant minus what will be decoded;
        empty unless ``residual`` is given).
    """
    if not wire.lossy:
        return wire.to_record(trained, packed=True), {}
    meant = {}
    for key, value in trained.items():
        value = value.detach().to("cpu", torch.float32)
        if _relative(key, value, received):
            value = value - received[key].to(torch.float32)
            if residual is not None and key in residual and residual[key].shape == value.shape:
                value = value + residual[key]
        meant[key] = value
    record = wire.to_record(meant, packed=True)
    new_residual = {}
    if residual is not None:
        sent = arrays_of(record)
        new_residual = {k: meant[k] - decode(sent[k]) for k in meant if _relative(k, meant[k], received)}
    return record, new_residual


def decode_update(
    decoded: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor], wire: Wire
) -> dict[str, torch.Tensor]:
    """The server's side of :func:`encode_update`: absolute float32 tensors from a decoded upload
    and the float32 tensors that node was sent (``reference``)."""
    if not wire.lossy:
        return dict(decoded)
    return {k: reference[k].to(torch.float32) + v if _relative(k, v, reference) else v for k, v in decoded.items()}


def pack(arrays: Mapping[str, Array]) -> Array:
    """Every array of a message in one: a zlib-compressed JSON index, then the arrays' bytes.

    Flower frames each Array on its own (a content hash, a metadata record, a key to hash map:
    about 370 bytes each), which for an adapter of many small factors costs as much as the
    scales of int8 codes; one Array per message pays it once.
    """
    index = [[key, a.dtype, list(a.shape), a.stype, len(a.data)] for key, a in arrays.items()]
    head = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)
    data = struct.pack("<I", len(head)) + head + b"".join(a.data for a in arrays.values())
    return Array(dtype="uint8", shape=(len(data),), stype=PACKED, data=data)


def unpack(array: Array) -> dict[str, Array]:
    """The arrays of :func:`pack`; :class:`WireError` for an index or size that does not add up."""
    data = array.data
    if array.stype != PACKED or len(data) < 4:
        raise WireError(f"not a packed record ({array.stype!r}, {len(data)} bytes)")
    (head_len,) = struct.unpack_from("<I", data)
    if head_len > min(len(data) - 4, MAX_INDEX_BYTES):
        raise WireError(f"packed index of {head_len} bytes in {len(data)}")
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(data[4 : 4 + head_len], 16 * MAX_INDEX_BYTES)
        if inflater.unconsumed_tail:
            raise WireError("packed index too large")
        index = json.loads(raw)
    except (zlib.error, ValueError, RecursionError) as err:
        raise WireError(f"unreadable packed index ({type(err).__name__})") from None
    out: dict[str, Array] = {}
    offset = 4 + head_len
    if not isinstance(index, list):
        raise WireError("packed index is not a list")
    for entry in index:
        try:
            key, dtype, shape, stype, size = entry
            valid = (
                isinstance(key, str)
                and isinstance(dtype, str)
                and isinstance(stype, str)
                and isinstance(shape, list)
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
                and isinstance(size, int)
                and size >= 0
            )
        except (TypeError, ValueError):
            valid = False
        if not valid or key in out or offset + size > len(data):
            raise WireError(f"malformed packed index entry {str(entry)[:80]}")
        out[key] = Array(dtype=dtype, shape=tuple(shape), stype=stype, data=bytes(data[offset : offset + size]))
        offset += size
    if offset != len(data):
        raise WireError(f"{len(data) - offset} bytes after the packed arrays")
    return out


def arrays_of(record: ArrayRecord) -> dict[str, Array]:
    """The arrays of a record by key, packed (:func:`pack`) or not."""
    keys = list(record.keys())
    if keys == [PACKED]:
        return unpack(record[PACKED])
    return {key: record[key] for key in keys}


def message_bytes(message: Message) -> int:
    """Bytes Flower moves for ``message``: every object of its tree, deflated (what its transport
    sends; identical chunks, an all-zero factor's say, once)."""
    return int(sum(len(obj.deflate()) for obj in get_all_nested_objects(message).values()))
