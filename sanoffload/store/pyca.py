"""The pieces of pyca/cryptography the repository's encryption uses, imported once.

crypt (the object format) and keys (key files) take them from here, so a host
without the package (a proxy installed without the ``s3`` extra) gets one clear
error naming what to install, not a traceback, whichever is imported first.
"""

from __future__ import annotations

from ..errors import MissingDependencyError

try:
    from cryptography.exceptions import InvalidTag as InvalidTag
    from cryptography.hazmat.primitives import hashes as hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM as AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF as HKDF
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt as Scrypt
except ImportError as exc:
    raise MissingDependencyError("encrypted repositories and keys need pyca/cryptography >= 42",
                                 hint="pip install 'sanoffload[s3]'") from exc
