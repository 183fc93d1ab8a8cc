"""SASL/OAUTHBEARER tokens for the Kafka clients: the OAuth 2.0 client-credentials grant.

The token endpoint is asked for a bearer token (RFC 6749 section 4.4, HTTP basic client
authentication) which is cached until shortly before it expires, so reconnects reuse it. The
client secret lives in a ``SecretStr`` and is never logged; neither is the token.

Usage::

    provider = ClientCredentialsTokenProvider(url, "streamer", SecretStr("..."), "kafka")
    KafkaConsumer(..., sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=provider)
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
import urllib.request

from kafka.sasl.oauth import AbstractTokenProvider
from pydantic import SecretStr

from streamer.errors import KafkaEdgeError

REFRESH_MARGIN_S = 30.0
TIMEOUT_S = 10.0


class ClientCredentialsTokenProvider(AbstractTokenProvider):  # type: ignore[misc]
    def __init__(
        self, token_url: str, client_id: str, client_secret: SecretStr, scope: str | None
    ) -> None:
        self.token_url = token_url
        self.client_id = client_id
        self._secret = client_secret
        self.scope = scope
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires = 0.0

    def __repr__(self) -> str:
        return f"ClientCredentialsTokenProvider({self.token_url!r}, {self.client_id!r})"

    def token(self) -> str:
        """A valid access token (fetched when none is cached or it expires within 30 s)."""
        with self._lock:
            if self._token is None or time.time() >= self._expires - REFRESH_MARGIN_S:
                self._token, self._expires = self._fetch()
            return self._token

    def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"}
        if self.scope:
            form["scope"] = self.scope
        basic = base64.b64encode(
            f"{urllib.parse.quote(self.client_id)}:"
            f"{urllib.parse.quote(self._secret.get_secret_value())}".encode()
        ).decode()
        request = urllib.request.Request(
            self.token_url, data=urllib.parse.urlencode(form).encode(), method="POST",
            headers={"Authorization": f"Basic {basic}",
                     "Content-Type": "application/x-www-form-urlencoded"},
        )
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
                body = json.loads(resp.read())
            token = str(body["access_token"])
            lifetime = float(body.get("expires_in", 300))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KafkaEdgeError(f"cannot get an OAuth token from {self.token_url}: "
                                 f"{type(exc).__name__}") from None
        return token, time.time() + lifetime
