"""SEAL's and TenSEAL's byte formats, read and written with numpy: no TenSEAL here.

Why this exists: TenSEAL is not safe on untrusted bytes (a crafted ciphertext can crash the
process). So secagg never hands it bytes that came off the wire: it reads the parameters and
the secret key out of its own key files here, and builds and reads ciphertexts itself
(``rlwe``). A ciphertext travels as raw coefficients, words below the data prime ``q``, 60 bits
each (``to_wire``: SEAL's primes have at most 60 bits, so two words fill 15 bytes); the
receiver unpacks them and checks every word against ``q`` (``from_wire``). The
server never loads TenSEAL at all: adding ciphertexts is adding their coefficients mod ``q``
(``add_mod``), which is all SEAL's own ``add`` does for two ciphertexts at the same level.
``to_tenseal`` writes a ciphertext in TenSEAL's format, so the tests can have SEAL decrypt
what the clients build.

Formats, as TenSEAL 0.3 and SEAL 4 write them (little-endian):

- TenSEAL ``CKKSVector``: protobuf ``{1: packed uint32 sizes, 2: bytes ciphertext, 3: double
  scale}``; the ciphertext field is a SEAL ``Ciphertext``.
- SEAL object: a 16-byte header ``magic 0xA15E | header size 16 | version major | minor |
  compression (0 none, 1 zlib, 2 zstd) | reserved u16 | total size u64``, then the body,
  compressed as the header says.
- SEAL ``Ciphertext`` body: ``parms_id 4 x u64 | is_ntt_form u8 | size u64 | N u64 |
  primes u64 | scale f64 | correction factor u64`` and a SEAL ``DynArray`` of the
  ``size x primes x N`` coefficients (its own header, a u64 count, the words).
- TenSEAL context: protobuf whose field 1 is SEAL ``EncryptionParameters`` (scheme u8, N u64,
  prime count u64, each prime as a SEAL ``Modulus`` object, then the plain modulus). Field 3
  holds the secret key; a public context has none.
- ``parms_id`` is BLAKE2b-256 over the u64 words ``scheme, N, primes..., plain modulus``;
  fresh ciphertexts live at the first level, whose only prime is the first one.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from secagg.errors import KeyFileError, PayloadError

SEAL_MAGIC = 0xA15E
#: The largest encryption noise of one coefficient of one ciphertext: SEAL's centered binomial
#: distribution is a difference of two 21-bit popcounts (``rlwe``). A sum of ``c`` ciphertexts
#: is off by at most ``21 c``, with certainty (not with high probability).
NOISE_BOUND = 21
_HEADER = struct.Struct("<HBBBBHQ")
_CT_META = struct.Struct("<32sBQQQdQ")
_COMPRESSION_NONE, _COMPRESSION_ZSTD = 0, 2
_SCHEME_CKKS = 2
#: TenSEAL context protobuf fields: parameters, public keys/settings, secret key, flags.
_CONTEXT_FIELDS = {1, 2, 3, 4}
_SECRET_FIELD = 3
#: Ciphertexts carry two polynomials (c0, c1) after encryption or addition.
POLYS = 2
#: Bits of one coefficient on the wire: SEAL's primes are at most 60 bits long.
WIRE_BITS = 60
_WIRE_MASK = np.uint64((1 << WIRE_BITS) - 1)
#: Two coefficients travel in 15 bytes (raw uint64 words would take 16).
_PAIR_BYTES = 2 * WIRE_BITS // 8


@dataclass(frozen=True)
class CiphertextShape:
    """What every fresh ciphertext under one key set looks like; all public information."""

    poly_modulus_degree: int
    modulus: int
    parms_id: bytes
    seal_version: tuple[int, int]

    @property
    def words(self) -> int:
        """Coefficient words per ciphertext: two polynomials of N coefficients."""
        return POLYS * self.poly_modulus_degree

    @property
    def nbytes(self) -> int:
        return 8 * self.words

    @property
    def c0_nbytes(self) -> int:
        """Bytes of one polynomial on the wire (``to_wire``), what a seeded ciphertext sends
        (``secagg.crypto.seeded``)."""
        return wire_nbytes(self.poly_modulus_degree)


# --- contexts ---------------------------------------------------------------------------------


def shape_of_context(context: bytes) -> CiphertextShape:
    """The ciphertext shape a serialized TenSEAL CKKS context implies (public or secret)."""
    fields = _context_fields(context)
    params = _seal_object(fields[1], "context parameters")
    try:
        scheme, n, count = struct.unpack_from("<BQQ", params)
        offset = 17
        primes = []
        for _ in range(count):
            head = _HEADER.unpack_from(params, offset)
            primes.append(struct.unpack_from("<Q", params, offset + _HEADER.size)[0])
            offset += head[-1]
    except struct.error as err:
        raise KeyFileError("context parameters are truncated; run 'secagg keygen'") from err
    if scheme != _SCHEME_CKKS or not primes or n & (n - 1) or n < 2:
        raise KeyFileError("context is not a CKKS context; run 'secagg keygen'")
    if primes[0].bit_length() > WIRE_BITS:
        raise KeyFileError(
            f"the context's data prime has {primes[0].bit_length()} bits; SEAL's primes have "
            f"at most {WIRE_BITS}: the key files are corrupt, run 'secagg keygen'"
        )
    # The first level's parms_id: scheme, N, the first prime, and a plain modulus of zero.
    words = struct.pack("<4Q", scheme, n, primes[0], 0)
    parms_id = hashlib.blake2b(words, digest_size=32).digest()
    version = _HEADER.unpack_from(fields[1])[2:4]
    return CiphertextShape(n, primes[0], parms_id, (version[0], version[1]))


def context_has_secret_key(context: bytes) -> bool:
    """True when a serialized TenSEAL context carries a secret key (protobuf field 3)."""
    return _SECRET_FIELD in _context_fields(context)


def secret_key_words(context: bytes, shape: CiphertextShape) -> np.ndarray:
    """The secret key of a client context, mod the data prime, in NTT form: (N,) uint64.

    SEAL stores the key as a ``Plaintext`` over every prime of the key level
    (``parms_id | coeff count u64 | scale f64 | DynArray``, prime ``j`` at words
    ``j*N .. (j+1)*N``); the data prime comes first.
    """
    fields = _context_fields(context)
    if _SECRET_FIELD not in fields:
        raise KeyFileError("the context holds no secret key; a client needs keys/client.ctx")
    try:
        inner = dict(_protobuf(fields[_SECRET_FIELD]))
        body = _seal_object(inner[1], "secret key")  # type: ignore[arg-type]
        (count,) = struct.unpack_from("<Q", body, 32)
        (stored,) = struct.unpack_from("<Q", body, 48 + _HEADER.size)
    except (IndexError, KeyError, ValueError, struct.error, PayloadError) as err:
        raise KeyFileError(f"the secret key in the context is unreadable ({err})") from err
    n = shape.poly_modulus_degree
    if count != stored or count % n or len(body) != 56 + _HEADER.size + 8 * count:
        raise KeyFileError("the secret key in the context has an unexpected layout")
    return np.frombuffer(body, dtype="<u8", offset=56 + _HEADER.size, count=n).copy()


def _context_fields(context: bytes) -> dict[int, bytes]:
    try:
        fields = dict(_protobuf(context))
    except (IndexError, ValueError) as err:
        raise KeyFileError(f"not a TenSEAL context ({err}); run 'secagg keygen'") from err
    if 1 not in fields or not set(fields) <= _CONTEXT_FIELDS:
        raise KeyFileError("not a TenSEAL CKKS context; run 'secagg keygen'")
    return {key: value for key, value in fields.items() if isinstance(value, bytes)}


# --- ciphertexts ------------------------------------------------------------------------------


def to_tenseal(coefficients: np.ndarray, size: int, scale: float, shape: CiphertextShape) -> bytes:
    """TenSEAL CKKSVector bytes of a ciphertext in SEAL's NTT form, (2, N) checked words (for
    tests: secagg itself never hands TenSEAL a ciphertext).

    Written uncompressed; SEAL reads any compression mode its header names.
    """
    words = np.ascontiguousarray(coefficients, dtype="<u8")
    if words.shape != (POLYS, shape.poly_modulus_degree):
        raise PayloadError("ciphertext has the wrong shape", reason="malformed")
    meta = _CT_META.pack(shape.parms_id, 1, POLYS, shape.poly_modulus_degree, 1, scale, 1)
    array = _seal_header(shape, 8 + words.nbytes) + struct.pack("<Q", words.size)
    body = b"".join((meta, array, words.tobytes()))
    ciphertext = _seal_header(shape, len(body)) + body
    sizes = _varint(size)
    return b"".join(
        (
            b"\x0a" + _varint(len(sizes)) + sizes,
            b"\x12" + _varint(len(ciphertext)) + ciphertext,
            b"\x19" + struct.pack("<d", scale),
        )
    )


def wire_nbytes(words: int) -> int:
    """Bytes of ``words`` coefficients on the wire (an even count: N is a power of two)."""
    return words // 2 * _PAIR_BYTES


def to_wire(words: np.ndarray) -> np.ndarray:
    """Coefficients below ``2**60`` (an even count) as bytes, two in every 15 (little-endian):
    ``w0 | w1 << 60`` in the first 8 bytes, ``w1 >> 4`` in the next 7. Every 15 bytes read back
    as two 60-bit words, so the form has no spare bits a forger could set."""
    pairs = words.reshape(-1, 2)
    out = np.empty(len(pairs) * _PAIR_BYTES, dtype=np.uint8)  # every byte is written below
    # Overlapping little-endian views: each pair's high word first (bytes 7-14, its low byte
    # 0), then its low word over bytes 0-7.
    _pair_view(out, 7, len(pairs))[:] = (pairs[:, 1] >> np.uint64(4)) << np.uint64(8)
    _pair_view(out, 0, len(pairs))[:] = pairs[:, 0] | (pairs[:, 1] << np.uint64(WIRE_BITS))
    return out


def from_wire(body: bytes | memoryview | np.ndarray, modulus: int) -> np.ndarray:
    """The coefficients ``body`` carries (``to_wire``'s form), each checked to be below
    ``modulus`` (PayloadError ``bad-ciphertext`` otherwise): a new uint64 array."""
    words = unpack_wire(body)
    check_coefficients(words, modulus)
    return words


def unpack_wire(body: bytes | memoryview | np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """The 60-bit words ``body`` carries, into ``out`` (uint64, one word per coefficient) or a
    new array, *unchecked* against q: only for a body ``from_wire`` has checked already."""
    data = np.frombuffer(body, dtype=np.uint8)
    if data.size % _PAIR_BYTES:
        raise PayloadError(
            "ciphertext body is not whole coefficients: the payload was cut or forged",
            reason="malformed",
        )
    pairs = data.size // _PAIR_BYTES
    words = np.empty((pairs, 2), dtype=np.uint64) if out is None else out.reshape(pairs, 2)
    if pairs:
        low, high = _pair_view(data, 0, pairs), _pair_view(data, 7, pairs)
        np.bitwise_and(low, _WIRE_MASK, out=words[:, 0])
        np.right_shift(high, np.uint64(8), out=words[:, 1])
        np.left_shift(words[:, 1], np.uint64(4), out=words[:, 1])
        np.bitwise_or(words[:, 1], low >> np.uint64(WIRE_BITS), out=words[:, 1])
    return words.reshape(-1)


def _pair_view(data: np.ndarray, offset: int, pairs: int) -> np.ndarray:
    """Little-endian uint64 words at ``offset`` of every 15-byte pair (unaligned, strided)."""
    return np.ndarray((pairs,), dtype="<u8", buffer=data, offset=offset, strides=(_PAIR_BYTES,))


def check_coefficients(coefficients: np.ndarray, modulus: int) -> None:
    """Refuse any coefficient that is not reduced mod q: no honest party ever makes one."""
    if coefficients.size and int(coefficients.max()) >= modulus:
        raise PayloadError(
            "ciphertext coefficient is not below the key's modulus: the payload was forged "
            "or made with other CKKS parameters",
            reason="bad-ciphertext",
        )


def add_mod(total: np.ndarray, other: np.ndarray, modulus: int) -> None:
    """``total = (total + other) mod q`` in place, for words already below ``q < 2**63``.

    Branch-free: ``t - q`` wraps around to above ``t`` exactly when ``t < q``, so the smaller
    of ``t`` and ``t - q`` (unsigned) is ``t mod q`` (seven times faster than a masked
    subtraction)."""
    np.add(total, other, out=total)
    np.minimum(total, total - np.uint64(modulus), out=total)


# --- byte-level helpers -----------------------------------------------------------------------


def _seal_header(shape: CiphertextShape, body: int) -> bytes:
    major, minor = shape.seal_version
    return _HEADER.pack(SEAL_MAGIC, _HEADER.size, major, minor, _COMPRESSION_NONE, 0, 16 + body)


def _seal_object(data: bytes, what: str) -> bytes:
    """The body of one SEAL object (header checked, decompressed when zstd-compressed)."""
    try:
        magic, head, _, _, compression, _, size = _HEADER.unpack_from(data)
    except struct.error as err:
        raise PayloadError(f"{what} is truncated", reason="malformed") from err
    if magic != SEAL_MAGIC or head != _HEADER.size or size != len(data):
        raise PayloadError(f"{what} is not a SEAL object", reason="malformed")
    body = data[_HEADER.size :]
    if compression == _COMPRESSION_NONE:
        return body
    if compression == _COMPRESSION_ZSTD:
        import zstandard

        try:
            return zstandard.ZstdDecompressor().decompress(body, max_output_size=1 << 28)
        except zstandard.ZstdError as err:
            raise PayloadError(f"{what} does not decompress", reason="malformed") from err
    raise PayloadError(f"{what} uses unsupported compression {compression}", reason="malformed")


def _protobuf(data: bytes) -> list[tuple[int, bytes | int | float]]:
    """Top-level fields of a protobuf message: varints, length-delimited bytes and doubles."""
    out: list[tuple[int, bytes | int | float]] = []
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            out.append((field, value))
        elif wire == 2:
            length, i = _read_varint(data, i)
            if i + length > len(data):
                raise ValueError("length-delimited field runs past the end")
            out.append((field, bytes(data[i : i + length])))
            i += length
        elif wire == 1:
            if i + 8 > len(data):
                raise ValueError("fixed64 field runs past the end")
            out.append((field, struct.unpack_from("<d", data, i)[0]))
            i += 8
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return out


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while shift < 64:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
    raise ValueError("varint is too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
