"""libgcrypt through ctypes: the calls Guix makes through guile-gcrypt ([GG] gcrypt/pk-crypto.scm).

Guix reads and prints keys, ACLs and signatures with libgcrypt's s-expression functions, and signs
and verifies with gcry_pk_sign/gcry_pk_verify; so does this module, on the same library
(`libgcrypt.so.20`, Debian's libgcrypt20). Nothing here is reimplemented: a key, a signature or
an error message is libgcrypt's own.
"""

from __future__ import annotations

import ctypes
import functools

GCRYSEXP_FMT_CANON, GCRYSEXP_FMT_ADVANCED = 1, 3
LIBRARY = "libgcrypt.so.20"


class GcryptError(Exception):
    """[GG] the 'gcry-error key: (error-source err) and (error-string err)."""

    def __init__(self, code: int) -> None:
        lib = library()
        self.source = (lib.gcry_strsource(code) or b"?").decode()
        self.text = (lib.gcry_strerror(code) or b"?").decode()
        super().__init__(f"{self.source}: {self.text}")


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library (OSError when it is not installed), initialised as guile-gcrypt does."""
    lib = ctypes.CDLL(LIBRARY)
    handle = ctypes.POINTER(ctypes.c_void_p)
    signatures: dict[str, tuple[object, list[object]]] = {
        "gcry_check_version": (ctypes.c_char_p, [ctypes.c_char_p]),
        "gcry_strerror": (ctypes.c_char_p, [ctypes.c_uint]),
        "gcry_strsource": (ctypes.c_char_p, [ctypes.c_uint]),
        "gcry_sexp_new": (ctypes.c_uint, [handle, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int]),
        "gcry_sexp_release": (None, [ctypes.c_void_p]),
        "gcry_sexp_sprint": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                               ctypes.c_size_t]),
        "gcry_sexp_find_token": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p,
                                                   ctypes.c_size_t]),
        "gcry_sexp_length": (ctypes.c_int, [ctypes.c_void_p]),
        "gcry_sexp_nth": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int]),
        "gcry_sexp_nth_data": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int,
                                                 ctypes.POINTER(ctypes.c_size_t)]),
        "gcry_pk_genkey": (ctypes.c_uint, [handle, ctypes.c_void_p]),
        "gcry_pk_sign": (ctypes.c_uint, [handle, ctypes.c_void_p, ctypes.c_void_p]),
        "gcry_pk_verify": (ctypes.c_uint, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        "gcry_pk_testkey": (ctypes.c_uint, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    lib.gcry_check_version(None)  # [GG] the library is initialised on load
    return lib


class Sexp:
    """One gcry_sexp_t (guile-gcrypt's canonical-sexp), released when collected."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __del__(self) -> None:
        library().gcry_sexp_release(self.handle)

    @classmethod
    def parse(cls, text: bytes | str) -> Sexp | None:
        """string->canonical-sexp: any syntax libgcrypt reads; None for an empty one (NULL)."""
        data = text.encode("latin-1") if isinstance(text, str) else text
        result = ctypes.c_void_p()
        code = library().gcry_sexp_new(ctypes.byref(result), data, len(data), 1)
        if code:
            raise GcryptError(code)
        return cls(result.value) if result.value else None

    def text(self) -> str:
        """canonical-sexp->string: libgcrypt's advanced format (bytes as Latin-1 characters)."""
        return self.printed(GCRYSEXP_FMT_ADVANCED).decode("latin-1")

    def printed(self, mode: int = GCRYSEXP_FMT_CANON) -> bytes:
        lib = library()
        size = lib.gcry_sexp_sprint(self.handle, mode, None, 0)
        buffer = ctypes.create_string_buffer(size)
        written = lib.gcry_sexp_sprint(self.handle, mode, buffer, size)
        return buffer.raw[:written]

    def find(self, token: str) -> Sexp | None:
        """find-sexp-token: the first sub-list whose head is TOKEN."""
        found = library().gcry_sexp_find_token(self.handle, token.encode(), len(token))
        return Sexp(found) if found else None

    def __len__(self) -> int:
        return int(library().gcry_sexp_length(self.handle))

    def nth(self, index: int) -> Sexp | None:
        """canonical-sexp-nth: the INDEXth element as an s-expression."""
        found = library().gcry_sexp_nth(self.handle, index)
        return Sexp(found) if found else None

    def nth_data(self, index: int) -> bytes | None:
        """canonical-sexp-nth-data: the INDEXth element's bytes, if it is an atom."""
        size = ctypes.c_size_t()
        pointer = library().gcry_sexp_nth_data(self.handle, index, ctypes.byref(size))
        return ctypes.string_at(pointer, size.value) if pointer else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sexp) and self.printed() == other.printed()

    def __hash__(self) -> int:
        return hash(self.printed())


def _call(function: str, *args: object) -> Sexp:
    result = ctypes.c_void_p()
    code = getattr(library(), function)(ctypes.byref(result), *args)
    if code:
        raise GcryptError(code)
    return Sexp(result.value or 0)


def generate_key(parameters: Sexp) -> Sexp:
    """[GG] generate-key: gcry_pk_genkey."""
    return _call("gcry_pk_genkey", parameters.handle)


def sign(data: Sexp, secret_key: Sexp) -> Sexp:
    """[GG] sign: gcry_pk_sign, the sig-val."""
    return _call("gcry_pk_sign", data.handle, secret_key.handle)


def verify(signature: Sexp, data: Sexp, public_key: Sexp) -> bool:
    """[GG] verify: true when gcry_pk_verify returns 0."""
    return verify_status(signature, data, public_key) == "Success"


def verify_status(signature: Sexp, data: Sexp, public_key: Sexp) -> str:
    """gcry_pk_verify's answer in words: "Success", "Bad signature", "Invalid object"..."""
    lib = library()
    return (lib.gcry_strerror(lib.gcry_pk_verify(signature.handle, data.handle,
                                                  public_key.handle)) or b"?").decode()


def key_status(secret_key: Sexp) -> str:
    """gcry_pk_testkey's answer in words: "Success" when the key is consistent (q is d·G)."""
    lib = library()
    return (lib.gcry_strerror(lib.gcry_pk_testkey(secret_key.handle)) or b"?").decode()
