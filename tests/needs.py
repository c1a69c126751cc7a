"""What a test needs beyond Python and the package, and what happens when it is missing.

Outside scripts/test a missing piece skips the test, with the reason and the fix; under
scripts/test (which sets BUILDFARM_TESTBED=1, and whose scripts/setup installs every piece) it
fails the test, so an independent check can never vanish without a word.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest
from guix_emulator import gcrypt
from testbed import ENV_REQUIRED


def unavailable(problem: str, fix: str = "run `bash scripts/test` as root") -> NoReturn:
    if os.environ.get(ENV_REQUIRED) == "1":
        pytest.fail(f"needed under scripts/test: {problem}", pytrace=False)
    pytest.skip(f"{problem}; {fix}")


def libgcrypt() -> None:
    """libgcrypt, what Guix signs and verifies with (the Guix emulator's and the signature
    tests' independent check)."""
    try:
        gcrypt.library()
    except OSError:
        unavailable(f"{gcrypt.LIBRARY} is not installed",
                    "install the Debian package libgcrypt20 (scripts/setup does)")
