"""Stage 1, admission: who is calling (authentication) and what the request is (a pure `plan`).

`plan` reads the body once and figures everything the later stages act on: the route and model, the
price and multiplier, the worst case to hold, the body to forward and what the cache may do. It takes
plain values and returns a frozen `Admission`; it does no I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..afford import affordable_output_tokens, with_output_limit
from ..cachekey import CachePlan
from ..caller import Caller
from ..config import ACCOUNT_SECRET_HEADER, Settings
from ..errors import BadRequest, RequestTimeout, Unauthorized
from ..pricing import (
    Multiplier,
    Price,
    PriceTable,
    estimate_prompt_tokens,
    unseen_prompt_tokens,
    worst_case,
)
from ..wire import MeteredRequest, Route, decode_request, prompt_count, unseen_inputs, with_usage_requested
from .attribution import MAX_USER_CHARS as MAX_USER_CHARS
from .attribution import end_user_of, tags_of
from .choices import NO_KEYS as NO_KEYS
from .choices import Choice as Choice
from .choices import KeySource as KeySource
from .choices import choices_for

if TYPE_CHECKING:
    from aiohttp import web

    from ..accounts import AccountDirectory
    from ..idempotency import IdempotencyPlan


@dataclass(frozen=True, slots=True)
class AdmitPolicy:
    """The settings admission reads."""

    account_header: str | None
    account_header_secret: str | None
    byok_header: str
    prompt_bytes_per_token: int
    afford_output_header: str
    afford_output_limit: bool
    tags_header: str = "x-creditgate-tags"

    @classmethod
    def from_settings(cls, s: Settings) -> AdmitPolicy:
        return cls(
            s.account_header,
            s.account_header_secret,
            s.byok_header,
            s.prompt_bytes_per_token,
            s.afford_output_header,
            s.afford_output_limit,
            s.tags_header,
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """One admitted request: what it is, what it may cost at worst, and what goes upstream."""

    request_id: str
    account: str
    route: Route
    request: MeteredRequest
    price: Price
    multiplier: Multiplier
    body: bytes  # what is forwarded (with each candidate's model name, when it differs)
    body_size: int  # the client's body size, for estimates
    hold: int  # the worst case, micro-credits: the most expensive candidate's
    # The worst case's parts: prompt tokens (body bytes and unseen inputs), and completions generated per
    # unit of output limit (prompts × max(n, best_of); 0 without output).
    prompt_tokens: int
    outputs: int
    byok_key: str | None  # the caller's own provider key (inline header or vault), when it has one
    strip_usage_chunk: bool  # the usage chunk was asked for on the client's behalf: withheld from it
    fit_output: bool  # lower the output limit to what the balance affords instead of a 402
    cache: CachePlan | None  # None: the cache is off
    started_ms: int
    # Attribution and spend-cap scopes: the API key's id (None in account-header mode), the request's
    # OpenAI `user` field, its tags from the tags header ("k=v").
    key_id: str | None = None
    end_user: str | None = None
    tags: tuple[str, ...] = ()
    idempotency: IdempotencyPlan | None = None  # None: no Idempotency-Key (or the feature is off)
    # Where the provider key comes from: "pool" (the operator's), "vault" (the account's stored key for
    # the upstream's provider), "inline" (the byok_header; it wins over the vault).
    key_source: KeySource = "pool"
    # The upstream candidates in their static order (the first is the primary). `price`, `multiplier`,
    # `byok_key` and `key_source` are the primary's until an upstream answered, then the serving one's
    # (`served_by`), so the charge is at the price and multiplier of the candidate that served.
    choices: tuple[Choice, ...] = ()
    upstream_model: str | None = None  # the model name the serving upstream was sent, when not ours

    @property
    def byok(self) -> bool:
        return self.byok_key is not None

    @property
    def any_own_key(self) -> bool:
        """Whether some candidate would go out with the caller's own key (such an answer is never shared
        across accounts by the cache: decided before any upstream is called, so the cache key does not
        depend on which one served)."""
        return self.byok or any(c.api_key is not None for c in self.choices)

    def served_by(self, choice: Choice | None) -> Admission:
        """The request as the candidate `choice` served it: its price, multiplier and key."""
        sent = choice.candidate.model if choice is not None else None
        if choice is None or (choice is self.choices[0] and (sent is None or sent == choice.price.model)):
            return self  # the primary served (the usual case): as admitted
        return dataclasses.replace(
            self,
            price=choice.price,
            multiplier=choice.multiplier,
            byok_key=choice.api_key,
            key_source=choice.key_source,
            upstream_model=sent if sent is not None and sent != choice.price.model else None,
        )

    @property
    def marked_up(self) -> bool:
        """Whether the pooled markup (pooled_multiplier) applies: the operator's key served."""
        return self.key_source == "pool"

    @property
    def output_limit(self) -> int:
        """The output limit the hold is figured for: the request's, else the model's maximum."""
        return self.request.output_limit or self.price.max_output_tokens

    def affordable(self, available: int) -> int:
        """The largest output limit `available` micro-credits cover, by the hold's own worst case: on
        every candidate (the least any of them affords)."""
        priced = [(c.price, c.multiplier) for c in self.choices] or [(self.price, self.multiplier)]
        return min(
            affordable_output_tokens(
                available, price, self.prompt_tokens, self.outputs, multiplier, self.output_limit
            )
            for price, multiplier in priced
        )

    def lowered_to(self, limit: int) -> Admission:
        """The same request with its output limit lowered to `limit`: body, hold and no cache."""
        choices = tuple(
            dataclasses.replace(
                c, hold=worst_case(c.price, self.prompt_tokens, self.outputs * limit, c.multiplier)
            )
            for c in self.choices
        )
        return dataclasses.replace(
            self,
            body=with_output_limit(self.body, self.route.kind, limit),
            hold=max(
                (c.hold for c in choices),
                default=worst_case(self.price, self.prompt_tokens, self.outputs * limit, self.multiplier),
            ),
            choices=choices,
            cache=None,
        )


async def authenticate(headers: Mapping[str, str], accounts: AccountDirectory, policy: AdmitPolicy) -> Caller:
    """Who a request acts for: the account in the trusted account header (sidecar mode; no key id), else
    the account and id of its API key."""
    header = policy.account_header
    if header:
        account = headers.get(header)
        if account:
            _check_account_secret(headers, header, policy.account_header_secret)
        if account and await accounts.exists(account):
            return Caller(account)
        if account:
            raise Unauthorized(f"Unknown account in the {header} header.")
    auth = headers.get("Authorization", "")
    scheme, _, api_key = auth.partition(" ")
    if scheme.lower() != "bearer" or not api_key.strip():
        raise Unauthorized("Missing API key: send `Authorization: Bearer <key>`.")
    found = await accounts.caller_for_key(api_key.strip(), time.monotonic())
    if found is None:
        raise Unauthorized("Incorrect, revoked or expired API key.")
    return found


def _check_account_secret(headers: Mapping[str, str], header: str, secret: str | None) -> None:
    """With account_header_secret set, naming an account in the header takes the secret too (checked
    before the account is looked up, so that no one without it learns which accounts exist)."""
    if not secret:
        return
    presented = headers.get(ACCOUNT_SECRET_HEADER, "")
    # Header values arrive decoded with surrogateescape: encode them back the same way.
    if not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), secret.encode()):
        raise Unauthorized(
            f"Missing or wrong {ACCOUNT_SECRET_HEADER} header: a request naming its account in the "
            f"{header} header must carry the account secret.",
            code="invalid_account_secret",
        )


async def read_body(request: web.Request, seconds: float) -> bytes:
    """The request body, read within `seconds` (body_read_timeout_seconds), else a 408: it is read before
    anything is held, so nothing is."""
    if request.content.is_eof():  # all of it arrived with the headers (the usual case): no timer
        return await request.read()
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {seconds:g} seconds (body_read_timeout_seconds)."
        ) from None


def identify(body: bytes, prices: PriceTable) -> tuple[MeteredRequest, Price]:
    """The request decoded, and the price of its model (aliases resolved); raises BadRequest."""
    parsed = decode_request(body)
    return parsed, prices.resolve(parsed.model)


def plan(
    request_id: str,
    account: str,
    route: Route,
    body: bytes,
    identified: tuple[MeteredRequest, Price],
    headers: Mapping[str, str],
    prices: PriceTable,
    policy: AdmitPolicy,
    *,
    key_id: str | None = None,
    own_keys: Mapping[str, str] = NO_KEYS,
    providers: Mapping[str, str] = NO_KEYS,
) -> Admission:
    """Everything the later stages act on but the cache's part (its key may take the key worker: the
    hold stage plans it, `Holder.plan_cache`); raises BadRequest naming the offending field.
    `own_keys` are the account's stored provider keys by provider, `providers` the provider of each
    upstream (unset: the upstream's name)."""
    parsed, price = identified
    limit = parsed.output_limit
    if limit is not None and limit > price.max_output_tokens:
        field_name = next(
            name
            for name in ("max_completion_tokens", "max_tokens", "max_output_tokens")
            if getattr(parsed, name)
        )
        raise BadRequest(
            f"{field_name} is {limit}, above the {price.max_output_tokens} output tokens allowed for "
            f"{price.model}.",
            param=field_name,
        )
    # Every completion generated is billed: max(n, best_of) per prompt, and /v1/completions takes a list
    # of prompts.
    choices = parsed.choices if route.has_n else 1
    prompts = prompt_count(parsed) if route.kind == "completions" else 1
    outputs = prompts * choices if route.has_output else 0
    prompt_tokens = estimate_prompt_tokens(len(body), policy.prompt_bytes_per_token) + unseen_prompt_tokens(
        price, unseen_inputs(parsed, route.kind)
    )
    output_tokens = outputs * (limit or price.max_output_tokens)
    routes = choices_for(
        prices,
        price,
        headers.get(policy.byok_header) or None,
        own_keys,
        providers,
        prompt_tokens,
        output_tokens,
    )
    primary = routes[0]
    strip = bool(
        parsed.stream
        and route.kind in ("chat", "completions")
        and not (parsed.stream_options and parsed.stream_options.include_usage)
    )
    fit = headers.get(policy.afford_output_header, "").lower() in ("1", "true")
    tags, end_user = tags_of(headers, policy.tags_header), end_user_of(parsed)
    return Admission(
        request_id=request_id,
        account=account,
        route=route,
        request=parsed,
        price=primary.price,
        multiplier=primary.multiplier,
        body=with_usage_requested(body, parsed) if strip else body,
        body_size=len(body),
        hold=max(c.hold for c in routes),
        prompt_tokens=prompt_tokens,
        outputs=outputs,
        byok_key=primary.api_key,
        key_source=primary.key_source,
        choices=routes,
        strip_usage_chunk=strip,
        fit_output=fit or policy.afford_output_limit,
        cache=None,
        started_ms=int(time.time() * 1000),
        key_id=key_id,
        end_user=end_user,
        tags=tags,
    )
