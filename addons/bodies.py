"""Bodies decoded with a bound: a 200 KB gzip bomb never becomes 256 MB in the gateway.

mitmproxy's ``get_content`` inflates a ``Content-Encoding`` body whole. The gateway
decodes request and response bodies only through :func:`decode_bounded`, which stops
at ``limit`` bytes of output (``TooLarge``). The identify stage decodes a vendor
request only after its vault key was found valid, then forwards the decoded body
(``Content-Encoding`` removed): the vendor reads exactly the bytes every check read,
whatever its own decoder does with trailing gzip members or stacked encodings.
"""

from __future__ import annotations

import zlib

import brotli
from mitmproxy import http

try:  # Python 3.14
    from compression import zstd  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - mitmproxy depends on the backport before 3.14
    from backports import zstd

DEFAULT_INFLATE_LIMIT = 32 * 1024 * 1024  # bytes of decoded body, requests and responses
DEFAULT_BODY_SIZE_LIMIT = "32m"  # mitmproxy's body_size_limit (raw bytes) when none is set
CHUNK = 64 * 1024


class TooLarge(ValueError):
    """The decoded body would be larger than the limit."""


class Undecodable(ValueError):
    """A Content-Encoding the gateway does not decode, or bytes that do not decode under it."""


def _over(limit: int) -> TooLarge:
    return TooLarge(f"decoded body over {limit} bytes")


# (Each decoder drops its output before raising: a traceback keeps its frame's locals alive.)
def _zlib(raw: bytes, wbits: int, limit: int) -> bytes:
    d = zlib.decompressobj(wbits)
    out = d.decompress(raw, limit + 1)
    if len(out) <= limit and not d.unconsumed_tail:
        out += d.flush(limit + 1 - len(out))
        if len(out) <= limit:
            return out
    del out
    raise _over(limit)


def _brotli(raw: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = d.process(raw, output_buffer_limit=limit + 1)
    if len(out) <= limit and d.can_accept_more_data():
        return out
    del out
    raise _over(limit)


def _zstd(raw: bytes, limit: int) -> bytes:
    d = zstd.ZstdDecompressor()
    out = d.decompress(raw, max_length=limit + 1)
    if len(out) <= limit and (d.needs_input or d.eof):
        return out
    del out
    raise _over(limit)


def decode_bounded(raw: bytes, encoding: str | None, limit: int) -> bytes:
    """``raw`` decoded under ``encoding`` (one of identity, gzip, deflate, br, zstd), at most
    ``limit`` bytes. Raises :class:`TooLarge` or :class:`Undecodable`."""
    enc = (encoding or "identity").strip().lower()
    if enc in ("", "identity", "none"):
        if len(raw) > limit:
            raise TooLarge(f"body over {limit} bytes")
        return raw
    if not raw:
        return b""
    try:
        if enc in ("gzip", "x-gzip"):
            return _zlib(raw, 47, limit)
        if enc in ("deflate", "deflateraw"):
            try:
                return _zlib(raw, 15, limit)
            except zlib.error:
                return _zlib(raw, -15, limit)
        if enc == "br":
            return _brotli(raw, limit)
        if enc == "zstd":
            return _zstd(raw, limit)
    except TooLarge:
        raise
    except (zlib.error, brotli.error, zstd.ZstdError, EOFError) as e:
        raise Undecodable(f"body does not decode as {enc}: {e}") from None
    raise Undecodable(f"Content-Encoding {encoding!r} is not one the gateway decodes")


_last: tuple[bytes, str | None, int, bytes | ValueError] | None = None


def content(message: http.Message, limit: int) -> bytes:
    """The message body decoded, bounded (see :func:`decode_bounded`).

    The last result is kept (like mitmproxy's own decode cache), so the meter and the scrub
    stage reading the same response decode it once."""
    global _last
    raw, enc = message.raw_content or b"", message.headers.get("content-encoding")
    if _last is not None and _last[0] is raw and _last[1] == enc and _last[2] == limit:
        result = _last[3]
    else:
        _last = None  # let the previous body go before decoding the next one
        try:
            result = decode_bounded(raw, enc, limit)
        except ValueError as e:
            result = type(e)(str(e))  # without its traceback (and the frames it keeps)
        _last = (raw, enc, limit, result) if enc else None
    if isinstance(result, ValueError):
        raise type(result)(str(result))
    return result


def content_or_none(message: http.Message, limit: int) -> bytes | None:
    """The decoded body, or None if it is over ``limit`` or does not decode."""
    try:
        return content(message, limit)
    except ValueError:
        return None


def decode_in_place(message: http.Message, limit: int) -> None:
    """Replace an encoded body by its decoded bytes (Content-Encoding removed, Content-Length set).
    A body without Content-Encoding is left alone (``body_size_limit`` bounds it).
    Raises :class:`TooLarge` or :class:`Undecodable`."""
    if "content-encoding" not in message.headers:
        return
    body = content(message, limit)
    del message.headers["content-encoding"]
    message.content = body
