"""S-expressions exactly as libgcrypt reads and prints them.

Guix keeps keys, ACLs and signatures as libgcrypt s-expressions and compares them structurally,
so reading must accept every syntax libgcrypt accepts (canonical `3:abc`, tokens, "quoted"
strings, #hex#, |base64|) and printing must give the same bytes as `gcry_sexp_sprint`.
A value is an atom (`bytes`) or a list (`tuple` of values).
"""

from __future__ import annotations

from typing import TypeAlias

from buildfarm.errors import BuildfarmError

Sexp: TypeAlias = bytes | tuple["Sexp", ...]
"""An atom (its raw bytes) or a list of s-expressions."""

_WHITESPACE = frozenset(b" \t\v\f\r\n")
# libgcrypt tests membership with strchr(), which also finds the terminating NUL: to libgcrypt a
# NUL byte is a token character, both when reading and when choosing how to print an atom.
_TOKEN_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-./_:*+=\x00"
)
_DIGITS = frozenset(b"0123456789")
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_BASE64_CHARS = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/="
)
_SIMPLE_ESCAPES = {
    ord("b"): 0x08, ord("t"): 0x09, ord("v"): 0x0B, ord("n"): 0x0A, ord("f"): 0x0C,
    ord("r"): 0x0D, ord('"'): 0x22, ord("'"): 0x27, ord("\\"): 0x5C,
}
_PRINT_ESCAPES = {value: b"\\" + bytes([key]) for key, value in _SIMPLE_ESCAPES.items()}
_MAX_ATOM = 0xFFFF  # libgcrypt stores atom lengths in an unsigned short


class SexpError(BuildfarmError):
    """Text that is not an s-expression libgcrypt would read; names the byte offset."""

    def __init__(self, offset: int, reason: str) -> None:
        self.offset = offset
        self.reason = reason
        super().__init__(f"invalid s-expression at byte {offset}: {reason}")


def parse(text: str | bytes) -> tuple[Sexp, ...]:
    """Read one list in any libgcrypt syntax (`str` is taken as UTF-8); trailing white space only.

    Display hints (`[hint]`) are read the way libgcrypt reads them: as plain atoms.
    """
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return _Parser(data).top_level()


class _Parser:
    """A port of libgcrypt's `do_vsexp_sscan` (without the printf-like `%` formats)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.in_hint = False

    def fail(self, reason: str, offset: int | None = None) -> SexpError:
        return SexpError(self.pos if offset is None else offset, reason)

    def skip_whitespace(self) -> None:
        data = self.data
        while self.pos < len(data) and data[self.pos] in _WHITESPACE:
            self.pos += 1

    def top_level(self) -> tuple[Sexp, ...]:
        self.skip_whitespace()
        if self.pos >= len(self.data):
            raise self.fail("empty input")
        if self.data[self.pos] != ord("("):
            raise self.fail("expected '(' at the start of the s-expression")
        result = self.read_list()
        if not result:
            raise self.fail("empty list '()' is not an s-expression", 0)
        self.skip_whitespace()
        if self.pos < len(self.data):
            raise self.fail("unexpected data after the s-expression")
        return result

    def read_list(self) -> tuple[Sexp, ...]:
        start = self.pos
        self.pos += 1  # '('
        items: list[Sexp] = []
        data = self.data
        while True:
            self.skip_whitespace()
            if self.pos >= len(data):
                raise self.fail("unmatched '('", start)
            char = data[self.pos]
            if char == ord(")"):
                if self.in_hint:
                    raise self.fail("')' inside a display hint")
                self.pos += 1
                return tuple(items)
            if char == ord("("):
                if self.in_hint:
                    raise self.fail("'(' inside a display hint")
                items.append(self.read_list())
            elif char == ord("["):
                if self.in_hint:
                    raise self.fail("nested display hint")
                self.in_hint = True
                self.pos += 1
            elif char == ord("]"):
                if not self.in_hint:
                    raise self.fail("unmatched ']'")
                self.in_hint = False
                self.pos += 1
            else:
                items.append(self.read_atom())

    def read_atom(self) -> bytes:
        data = self.data
        start = self.pos
        char = data[start]
        if char in _DIGITS:
            if char == ord("0"):
                raise self.fail("a length may not begin with 0")
            end = start
            while end < len(data) and data[end] in _DIGITS:
                end += 1
            if end >= len(data):
                raise self.fail("length without data", start)
            marker = data[end]
            if marker == ord(":"):
                length = int(data[start:end])
                begin = end + 1
                if begin + length > len(data):
                    raise self.fail(f"atom of {length} bytes runs past the end", end)
                self.pos = begin + length
                return self.checked(data[begin:self.pos], start)
            if marker not in b'"#|':
                raise self.fail("invalid length specification", end)
            self.pos = end  # the length before a string, hex or base64 atom is ignored
            char = marker
        if char == ord('"'):
            return self.checked(self.read_quoted(), start)
        if char == ord("#"):
            return self.checked(self.read_hex(), start)
        if char == ord("|"):
            return self.checked(self.read_base64(), start)
        if char in _TOKEN_CHARS:
            end = start
            while end < len(data) and data[end] in _TOKEN_CHARS:
                end += 1
            self.pos = end
            return data[start:end]
        if char in b"&\\{":
            raise self.fail(f"unexpected punctuation {chr(char)!r}")
        raise self.fail(f"bad character {_show(char)}")

    def checked(self, atom: bytes, start: int) -> bytes:
        if len(atom) > _MAX_ATOM:
            raise self.fail(f"atom longer than {_MAX_ATOM} bytes", start)
        return atom

    def read_quoted(self) -> bytes:
        data = self.data
        start = self.pos
        pos = start + 1
        out = bytearray()
        while True:
            if pos >= len(data):
                raise self.fail("unterminated string", start)
            char = data[pos]
            if char == ord('"'):
                self.pos = pos + 1
                return bytes(out)
            if char != ord("\\"):
                out.append(char)
                pos += 1
                continue
            pos += 1
            if pos >= len(data):
                raise self.fail("unterminated string", start)
            escape = data[pos]
            if escape in _SIMPLE_ESCAPES:
                out.append(_SIMPLE_ESCAPES[escape])
                pos += 1
            elif escape in b"01234567":
                digits = data[pos:pos + 3]
                if len(digits) != 3 or any(d not in b"01234567" for d in digits):
                    raise self.fail("invalid octal escape", pos)
                out.append(int(digits, 8) & 0xFF)  # libgcrypt keeps the low 8 bits
                pos += 3
            elif escape == ord("x"):
                digits = data[pos + 1:pos + 3]
                if len(digits) != 2 or any(d not in _HEX_DIGITS for d in digits):
                    raise self.fail("invalid hex escape", pos)
                out.append(int(digits, 16))
                pos += 3
            elif escape in b"\r\n":
                # A backslash before a line break continues the string on the next line.
                pos += 1
                if pos < len(data) and data[pos] in b"\r\n" and data[pos] != escape:
                    pos += 1
            else:
                raise self.fail(f"invalid escape {_show(escape)} in string", pos)

    def read_hex(self) -> bytes:
        data = self.data
        start = self.pos
        end = data.find(b"#", start + 1)
        if end < 0:
            raise self.fail("unterminated hex string", start)
        digits = bytearray()
        for offset in range(start + 1, end):
            char = data[offset]
            if char in _HEX_DIGITS:
                digits.append(char)
            elif char not in _WHITESPACE:
                raise self.fail(f"bad hex character {_show(char)}", offset)
        if len(digits) % 2:
            raise self.fail("odd number of hex digits", end)
        self.pos = end + 1
        return bytes.fromhex(digits.decode("ascii"))

    def read_base64(self) -> bytes:
        data = self.data
        start = self.pos
        end = data.find(b"|", start + 1)
        if end < 0:
            raise self.fail("unterminated base64 string", start)
        body = data[start + 1:end]
        for offset, char in enumerate(body, start + 1):
            if char not in _BASE64_CHARS:
                raise self.fail(f"bad base64 character {_show(char)}", offset)
        if not body:
            raise self.fail("empty base64 string", start)
        decoded = _decode_base64(body)
        self.pos = end + 1
        return decoded


_BASE64_VALUES = {char: value for value, char in enumerate(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _decode_base64(body: bytes) -> bytes:
    """Base64 the lenient way libgcrypt's decoder (gpgrt) reads it: padding optional, data after
    the first '=' ignored, a lone sextet before '=' still gives a byte."""
    out = bytearray()
    bits = count = 0
    for char in body:
        if char == ord("="):
            if count == 1:
                out.append(bits << 2 & 0xFF)
                count = 0
            break
        bits = bits << 6 | _BASE64_VALUES[char]
        count += 1
        if count == 4:
            out += bits.to_bytes(3, "big")
            bits = count = 0
    if count == 2:
        out.append(bits >> 4 & 0xFF)
    elif count == 3:
        out += (bits >> 2 & 0xFFFF).to_bytes(2, "big")
    return bytes(out)


def _show(char: int) -> str:
    return repr(chr(char)) if 0x20 <= char < 0x7F else f"byte 0x{char:02x}"


def canonical(sexp: Sexp) -> bytes:
    """The canonical encoding (GCRYSEXP_FMT_CANON): `(4:hash6:sha256...)`, no spaces."""
    out = bytearray()
    _write_canonical(sexp, out)
    return bytes(out)


def _write_canonical(sexp: Sexp, out: bytearray) -> None:
    if isinstance(sexp, bytes):
        out += b"%d:" % len(sexp)
        out += sexp
        return
    out += b"("
    for item in sexp:
        _write_canonical(item, out)
    out += b")"


def advanced(sexp: Sexp, *, ascii_only: bool = False) -> bytes:
    """The advanced format (GCRYSEXP_FMT_ADVANCED) byte for byte, ending in a newline.

    Guix writes its key files, ACL and signatures this way. It is ASCII unless an atom holds
    bytes 0xA1-0xFF that libgcrypt deems printable; with `ascii_only` such an atom is written
    #HEX# instead, which every s-expression reader (libgcrypt's included) reads the same.
    """
    events: list[bytes | bool] = []  # True = open, False = close, bytes = atom
    _flatten(sexp, events)
    out = bytearray()
    indent = 0
    for index, event in enumerate(events):
        following: bytes | bool | None = events[index + 1] if index + 1 < len(events) else None
        if event is True:
            if indent:
                out += b"\n"
            out += b" " * indent + b"("
            indent += 1
        elif event is False:
            out += b")"
            indent -= 1
            if following is not True and following is not None:
                out += b"\n" + b" " * indent
        else:
            assert isinstance(event, bytes)
            atom = _advanced_atom(event)
            if ascii_only and not atom.isascii():
                atom = b"#" + event.hex().upper().encode("ascii") + b"#"
            out += atom
            if following is not False:
                out += b" "
    out += b"\n"
    return bytes(out)


def _flatten(sexp: Sexp, events: list[bytes | bool]) -> None:
    if isinstance(sexp, bytes):
        events.append(sexp)
        return
    events.append(True)
    for item in sexp:
        _flatten(item, events)
    events.append(False)


def _is_binary_byte(char: int) -> bool:
    return char < 0x20 or 0x7F <= char <= 0xA0


def _advanced_atom(atom: bytes) -> bytes:
    """libgcrypt's `suitable_encoding` choice: token, "string" or #HEX#."""
    if not atom:
        return b'""'
    if atom[0] & 0x80 or atom[0] == 0:
        return b"#" + atom.hex().upper().encode("ascii") + b"#"
    # NUL counts as printable here too (the same strchr() quirk).
    if any(_is_binary_byte(c) and c not in _PRINT_ESCAPES and c != 0 for c in atom):
        return b"#" + atom.hex().upper().encode("ascii") + b"#"
    if atom[0] not in _DIGITS and all(c in _TOKEN_CHARS for c in atom):
        return atom
    out = bytearray(b'"')
    for char in atom:
        if char in _PRINT_ESCAPES:
            out += _PRINT_ESCAPES[char]
        elif _is_binary_byte(char):
            out += b"\\x%02x" % char
        else:
            out.append(char)
    out += b'"'
    return bytes(out)


def find_token(sexp: Sexp, token: bytes) -> tuple[Sexp, ...] | None:
    """The first list, depth first and the top level included, whose head is the atom `token`.

    This is `gcry_sexp_find_token`, which Guix uses to pick `data`, `sig-val` and `public-key`
    out of a signature.
    """
    if isinstance(sexp, bytes):
        return None
    if sexp and sexp[0] == token:
        return sexp
    for item in sexp:
        found = find_token(item, token)
        if found is not None:
            return found
    return None
