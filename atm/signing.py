"""Signed messages: an HMAC-SHA256 over a message's canonical JSON, and where the key comes from.

Anyone who can write a run's tags (or its W&B inbox) could otherwise steer the job, so every
message that moves a job or that the daemon later treats as its own carries ``signature`` and
``key_id``; the other side checks them with its own key and ignores what does not check out.

The key, on both sides: ``ATM_KEY`` (the secret itself) or ``ATM_KEY_FILE`` (a file holding it);
with neither set, a per-user key file created on first use with mode 0600 at
``$XDG_CONFIG_HOME/atm/key`` (``~/.config/atm/key``), so a job and a watcher run by one account on
one machine share it with no set-up. Everything here but key resolution (:func:`resolve_key`,
:class:`KeySource`) is pure, and this module imports nothing of atm's, so both sides can use it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

log = logging.getLogger("atm.signing")

KEY_ENV = "ATM_KEY"
KEY_FILE_ENV = "ATM_KEY_FILE"
#: The fields a signature adds to a message; everything else in the message is covered by it.
SIGNATURE_FIELDS = frozenset({"signature", "key_id"})
#: Shortest secret accepted: a short one can be guessed offline from one signed tag.
MIN_KEY_CHARS = 16

M = TypeVar("M", bound=BaseModel)

_warned_modes: set[str] = set()


class KeyUnavailable(ValueError):
    """No usable key: the message says which setting is wrong and how to fix it."""


@dataclass(frozen=True)
class SigningKey:
    """A secret and where it came from (for messages). Its ``repr`` never shows the secret."""

    secret: bytes
    #: ``ATM_KEY``, ``ATM_KEY_FILE=/path`` or the default file's path: named in every mismatch message.
    source: str

    @property
    def key_id(self) -> str:
        """A short public name for the key: equal on both sides exactly when the secrets are."""
        return hmac.new(self.secret, b"atm key id", hashlib.sha256).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r}, source={self.source!r})"


@dataclass(frozen=True)
class SignatureCheck:
    """Whether a message's signature checks out with a key; ``reason`` says why not, and what to do."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


# --------------------------------------------------------------------------- the key


def key_from_text(text: str, source: str) -> SigningKey:
    """A key from its text form (what ``ATM_KEY`` or a key file holds; surrounding whitespace ignored).

    Raises:
        KeyUnavailable: the text is shorter than :data:`MIN_KEY_CHARS`.
    """
    secret = text.strip()
    if len(secret) < MIN_KEY_CHARS:
        raise KeyUnavailable(
            f"{source}: the atm key is {len(secret)} characters; use at least {MIN_KEY_CHARS}, e.g. the output of "
            "`python -c 'import secrets; print(secrets.token_hex(32))'`"
        )
    return SigningKey(secret.encode("utf-8"), source)


def default_key_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CONFIG_HOME/atm/key``, or ``~/.config/atm/key`` (a relative XDG_CONFIG_HOME is ignored, as the XDG spec says)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CONFIG_HOME", "")
    if not base or not os.path.isabs(base):
        home = env.get("HOME") or os.path.expanduser("~")
        if not home or home == "~":
            raise KeyUnavailable(f"no home directory to keep the atm key in: set {KEY_ENV} or {KEY_FILE_ENV}")
        base = os.path.join(home, ".config")
    return Path(base) / "atm" / "key"


def resolve_key(environ: Mapping[str, str] | None = None) -> SigningKey:
    """The key this process signs and checks with: ``ATM_KEY``, else ``ATM_KEY_FILE``, else the
    per-user default file (created on first use, mode 0600).

    Raises:
        KeyUnavailable: both variables set, a key file that cannot be read or is too short, or no
            place for the default file. The message names the variable or file and the fix.
    """
    env = os.environ if environ is None else environ
    text, path = env.get(KEY_ENV), env.get(KEY_FILE_ENV)
    if text is not None and path is not None:
        raise KeyUnavailable(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; keep one, so it is clear which key signs")
    if text is not None:
        return key_from_text(text, KEY_ENV)
    if path is not None:
        try:
            return key_from_text(Path(path).expanduser().read_text(encoding="utf-8"), f"{KEY_FILE_ENV}={path}")
        except OSError as exc:
            raise KeyUnavailable(f"{KEY_FILE_ENV}={path}: cannot read the atm key ({exc.strerror or exc})") from exc
    default = default_key_path(env)
    try:
        return _default_key(default)
    except OSError as exc:
        raise KeyUnavailable(
            f"cannot read or create the atm key file {default} ({exc.strerror or exc}); set {KEY_ENV} or {KEY_FILE_ENV}"
        ) from exc


def _default_key(path: Path) -> SigningKey:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = _create_key_file(path)
    else:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077 and str(path) not in _warned_modes:
            _warned_modes.add(str(path))
            log.warning("atm: the key file %s can be read by other users (mode %o): chmod 600 %s", path, mode, path)
    return key_from_text(text, str(path))


def _create_key_file(path: Path) -> str:
    """Write a new random key to ``path`` (0600, its folder 0700) unless another process just did.

    The key is written whole to a temporary file and linked into place, which fails if the name
    exists: two processes starting at once end up with the same key, never with half of one.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".key-", dir=path.parent)  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)
            log.info("atm: created the key file %s (mode 600); a job and a watcher run by this user share it", path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        os.unlink(tmp)
    return path.read_text(encoding="utf-8")


class KeySource:
    """A key given up front, or resolved from the environment on first use and kept.

    Backends and channels sign with one; resolving lazily means a process that never signs or
    checks anything (``atm policy check``) never creates a key file, and a bad setting is reported
    where a key is needed, with :attr:`problem` kept for messages.
    """

    def __init__(self, key: SigningKey | None = None):
        self._key = key
        #: Why no key could be resolved ("" while none was tried or one was found).
        self.problem = ""

    def get(self) -> SigningKey:
        """The key. Raises :class:`KeyUnavailable` (each time, until the setting is fixed)."""
        if self._key is None:
            try:
                self._key = resolve_key()
            except KeyUnavailable as exc:
                self.problem = str(exc)
                raise
            self.problem = ""
        return self._key

    def get_or_none(self) -> SigningKey | None:
        """The key, or None with :attr:`problem` saying why."""
        try:
            return self.get()
        except KeyUnavailable:
            return None


# --------------------------------------------------------------------------- signing


def canonical_json(message: BaseModel) -> bytes:
    """The bytes a signature covers: the message as its JSON, minus the signature fields and the
    fields left at their defaults, with keys sorted and no whitespace. Computed from the JSON form (not
    the Python values) so that a message read back from a tag or a file gives the same bytes as the one
    that was signed. Defaults are left out so that a field a later release adds (with a default) does
    not change what an earlier one signed: a watcher's decision log stays its own across an upgrade."""
    body = json.loads(message.model_dump_json(exclude=set(SIGNATURE_FIELDS), exclude_defaults=True))
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def signature_of(message: BaseModel, key: SigningKey) -> str:
    """The hex HMAC-SHA256 of ``message`` under ``key``. The message's type is part of what is
    signed, so a signed decision record cannot pass for an update with the same fields."""
    domain = f"atm/{type(message).__name__}\n".encode()
    return hmac.new(key.secret, domain + canonical_json(message), hashlib.sha256).hexdigest()


def sign(message: M, key: SigningKey) -> M:
    """A copy of ``message`` (an Update, Ack or DecisionRecord) carrying ``key``'s signature and key id."""
    return message.model_copy(update={"signature": signature_of(message, key), "key_id": key.key_id})


def verify(message: BaseModel, key: SigningKey | None, *, key_problem: str = "", here: str = "this side") -> SignatureCheck:
    """Whether ``message`` was signed with ``key``, and if not, a reason that names the fix.

    Args:
        message: a signed message type (with ``signature`` and ``key_id`` fields).
        key: this side's key; None when it could not be resolved.
        key_problem: why there is no key (the :class:`KeyUnavailable` message), for the reason.
        here: how the reason names the checking side (``this job``, ``this watcher``).
    """
    what = _describe(message)
    signature: Any = getattr(message, "signature", None)
    key_id: Any = getattr(message, "key_id", None)
    if key is None:
        return SignatureCheck(False, f"{what} cannot be checked: {here} has no atm key ({key_problem or 'none given'})")
    if not signature or not key_id:
        return SignatureCheck(
            False,
            f"{what} is not signed: it was not written by an atm-watch holding a key (another client of the tracker, "
            f"or an atm release older than signing); ignored",
        )
    if key_id != key.key_id:
        return SignatureCheck(
            False,
            f"{what} is signed with key id {key_id}, {here} has key id {key.key_id} (from {key.source}): give both "
            f"sides the same {KEY_ENV} (or {KEY_FILE_ENV}); ignored",
        )
    if not hmac.compare_digest(str(signature), signature_of(message, key)):
        version = getattr(message, "schema_version", None)
        expected = type(message).model_fields.get("schema_version")
        hint = ""
        if expected is not None and version != expected.default:
            hint = f" (it has schema version {version}, {here} {expected.default}: use one atm release on both sides)"
        return SignatureCheck(False, f"{what} does not match its signature: it was changed after signing{hint}; ignored")
    return SignatureCheck(True)


def _describe(message: BaseModel) -> str:
    kinds = {"Update": "update", "Ack": "ack", "DecisionRecord": "decision record", "Approval": "approval"}
    kind = kinds.get(type(message).__name__, type(message).__name__)
    seq = getattr(message, "seq", None)
    return f"{kind} #{seq}" if seq is not None else kind


__all__ = [
    "KEY_ENV",
    "KEY_FILE_ENV",
    "KeySource",
    "KeyUnavailable",
    "SignatureCheck",
    "SigningKey",
    "canonical_json",
    "default_key_path",
    "key_from_text",
    "resolve_key",
    "sign",
    "signature_of",
    "verify",
]
