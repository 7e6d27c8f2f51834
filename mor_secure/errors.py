"""The named error hierarchy. Every error a user can cause says what was wrong and how to fix it."""


class MorSecureError(Exception):
    """Base class of every error mor_secure raises on purpose."""


class ConfigError(MorSecureError, ValueError):
    """A configuration value is missing, malformed or unsafe. The message names the field and the fix."""


class PrivacyError(MorSecureError):
    """A privacy guarantee would be weakened or cannot be established."""


class BudgetExceededError(PrivacyError):
    """A release was refused because it would take a client past its (epsilon, delta) budget."""


class LedgerError(PrivacyError):
    """A ledger is unreadable, broken, or failed verification."""


class ProtocolError(MorSecureError):
    """A federation message is malformed (wrong keys, shapes, types or values)."""


class CryptoError(MorSecureError):
    """Encryption, decryption, key or certificate material is missing or invalid."""
