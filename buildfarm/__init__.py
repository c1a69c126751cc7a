"""buildfarm: a build coordinator for GNU Guix build farms."""

import warnings

from cryptography.utils import CryptographyDeprecationWarning

# asyncssh (2.24) still names cryptography's DSA types, which cryptography (>= 48) deprecates
# with a warning printed before any command's output. Silence exactly that one, from asyncssh,
# before anything imports it; every other warning stays.
warnings.filterwarnings(
    "ignore",
    message="DSA is deprecated",
    category=CryptographyDeprecationWarning,
    module=r"asyncssh\.",
)

__version__ = "0.1.0"
