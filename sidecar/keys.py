"""Every Redis key name creditgate uses, built in one place.

An account's keys share one hash tag, ``{p<N>}``, so a script touching an account's balance, holds and
markers stays inside one hash slot and runs unchanged on Redis Cluster. Accounts map to partitions by a
stable hash (CRC-32 of the account id), so the mapping never changes while ``partitions`` does not.
Changing ``partitions`` on a store that holds data orphans it: treat it as fixed at first start.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AccountKeys:
    """The keys of one account, all in one hash slot."""

    account: str
    partition: int
    balance: str  # hash: balance, held, created_at
    holds: str  # hash: request id -> held micro-credits
    hold_expiry: str  # zset (partition-wide): "<account> <request id>" scored by lease end (ms)
    api_keys: str  # set of the account's API key ids
    outbox: str  # stream (partition-wide): settled debits on their way to Postgres
    ready: str  # string (partition-wide): set once the partition's balances came from the ledger
    tag: str
    # The wallet (docs in README "Redis layout"): grants, spend caps and what counts against them.
    grants: str  # hash: grant id -> "remaining expires_ms priority order_ms idle kind"
    wallet_due: str  # zset (partition-wide): account scored by when one of its grants may expire next
    caps: str  # hash: "<scope>|<period>" -> limit; "tz" -> the account's time zone
    cap_held: str  # hash: scope -> micro-credits held by the account's live holds in that scope
    hold_scopes: str  # hash: request id -> the scopes its hold counts in ("\n"-joined)
    # The BYOK vault's mirror (vault/mirror.py): provider -> the sealed key record (never plain text).
    llm_keys: str

    def spend(self, period_id: str) -> str:
        """Hash: scope -> micro-credits settled in the period ("total", "d2026-12-07", "m2026-12")."""
        return f"{self.tag}:spend:{self.account}:{period_id}"

    def settled(self, request_id: str) -> str:
        return f"{self.tag}:settled:{request_id}"

    def credited(self, idempotency_key: str) -> str:
        return f"{self.tag}:credited:{self.account}:{idempotency_key}"

    def debited(self, debit_id: str) -> str:
        """What the debit script took back for this id (micro-credits, an integer string)."""
        return f"{self.tag}:debited:{self.account}:{debit_id}"

    def expiry_member(self, request_id: str) -> str:
        return f"{self.account} {request_id}"

    def operation(self, hold_id: str) -> str:
        """Hash: an operation hold's metadata (metering/operations.py: its spec, settle claim, result),
        in the account's slot; it lives a settled-marker window past the hold."""
        return f"{self.tag}:operation:{self.account}:{hold_id}"

    def cache(self, digest: str) -> str:
        """A response-cache entry scoped to this account (its digest covers the account), in the
        account's slot so the money scripts can look it up and store it in the same round trip."""
        return f"{self.tag}:cache:{digest}"

    def idempotent(self, digest: str) -> str:
        """The answer (or an in-flight request's claim) filed under an Idempotency-Key of this account
        (`digest`: the key's SHA-256), in the account's slot like its cache entries."""
        return f"{self.tag}:idem:{self.account}:{digest}"


class KeySpace:
    def __init__(self, prefix: str, partitions: int) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self._cache: dict[str, AccountKeys] = {}

    def partition_of(self, account: str) -> int:
        return zlib.crc32(account.encode()) % self.partitions

    def partition_tag(self, partition: int) -> str:
        return f"{self.prefix}{{p{partition}}}"

    def hold_expiry(self, partition: int) -> str:
        return f"{self.partition_tag(partition)}:hold-expiry"

    def outbox(self, partition: int) -> str:
        """Stream of settled debits; the flusher moves them to Postgres and deletes them once committed."""
        return f"{self.partition_tag(partition)}:outbox"

    def wallet_due(self, partition: int) -> str:
        """Zset of accounts scored by the next time one of their grants may expire (ms): the sweeper's."""
        return f"{self.partition_tag(partition)}:wallet-due"

    def ready(self, partition: int) -> str:
        """Set by the rebuild (or at first start) in the partition's own slot: money in is credited only
        once it exists, so a credit can never land before a rebuild that sets balances from the ledger."""
        return f"{self.partition_tag(partition)}:ready"

    def dead_letters(self, partition: int) -> str:
        """Stream of outbox entries the ledger can never take (unreadable, or refused by Postgres), each
        with the reason and its outbox id; parked by the flusher for an operator, never written."""
        return f"{self.partition_tag(partition)}:outbox-dead-letters"

    @property
    def initialized(self) -> str:
        """Set once Redis holds the balances rebuilt from (or created with) the Postgres ledger."""
        return f"{self.prefix}initialized"

    @property
    def rebuild_lock(self) -> str:
        return f"{self.prefix}rebuild-lock"

    def account(self, account: str) -> AccountKeys:
        keys = self._cache.get(account)
        if keys is None:
            partition = self.partition_of(account)
            tag = self.partition_tag(partition)
            keys = AccountKeys(
                account=account,
                partition=partition,
                balance=f"{tag}:account:{account}",
                holds=f"{tag}:holds:{account}",
                hold_expiry=self.hold_expiry(partition),
                api_keys=f"{tag}:api-keys:{account}",
                outbox=self.outbox(partition),
                ready=self.ready(partition),
                tag=tag,
                grants=f"{tag}:grants:{account}",
                wallet_due=self.wallet_due(partition),
                caps=f"{tag}:caps:{account}",
                cap_held=f"{tag}:cap-held:{account}",
                hold_scopes=f"{tag}:hold-scopes:{account}",
                llm_keys=f"{tag}:llm-keys:{account}",
            )
            if len(self._cache) < 100_000:
                self._cache[account] = keys
        return keys

    def shared_cache(self, digest: str) -> str:
        """A response-cache entry shared by every account (``cache_scope: shared``)."""
        return f"{self.prefix}cache:{digest}"

    @property
    def accounts(self) -> str:
        """Set of every account id."""
        return f"{self.prefix}accounts"

    def api_key(self, key_hash: str) -> str:
        """Hash: account, id, created_at — looked up by the SHA-256 of the presented key."""
        return f"{self.prefix}api-key:{key_hash}"

    def api_key_id(self, key_id: str) -> str:
        """String: the key hash behind a public key id, for revocation."""
        return f"{self.prefix}api-key-id:{key_id}"

    def portal_session(self, token_hash: str) -> str:
        """Hash: a billing-portal session (portal/sessions.py), by the SHA-256 of its cookie's token;
        it expires portal_session_seconds after its last page (portal_session_max_seconds after it was
        opened at the latest)."""
        return f"{self.prefix}portal-session:{token_hash}"

    def portal_signin(self, address: str, window: int) -> str:
        """String: the failed billing-portal sign-ins from one client address in one fixed window (the
        app's clock divided by portal_signin_window_seconds; portal/attempts.py); it expires one window
        after its first count."""
        return f"{self.prefix}portal-signin:{window}:{address}"

    def portal_new_key(self, token_hash: str) -> str:
        """String: an API key the session just made, sealed, kept for the one page that shows it
        (portal/sessions.py); it expires after NEW_KEY_SECONDS."""
        return f"{self.prefix}portal-new-key:{token_hash}"


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (the client returns bytes)."""
    return value.decode() if isinstance(value, bytes) else value
