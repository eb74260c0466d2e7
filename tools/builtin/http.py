"""`http_fetch`: a GET tool limited to an allowlist of hosts.

The user fixes the allowlist, the byte cap and the time limit when building the
tool; the model only chooses the URL (and optionally a character cap). Every
redirect hop is checked against the allowlist, since aiohttp's automatic
redirects are turned off. Host names are matched as strings: the allowlist does
not defend against DNS that resolves an allowed name to a private address.
"""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from agentrt.tools import Tool, ToolError, tool

if TYPE_CHECKING:
    import aiohttp
    from yarl import URL

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
DEFAULT_PORTS = {"http": 80, "https": 443}
TEXT_TYPES = frozenset({
    "application/json", "application/xml", "application/javascript",
    "application/ecmascript", "application/x-www-form-urlencoded",
    "application/yaml", "application/x-yaml", "application/toml",
    "application/sql", "application/graphql", "image/svg+xml",
})
USER_AGENT = "agentrt-fetch/0.1"


@dataclass(frozen=True, slots=True)
class HostRule:
    """One allowlist entry: `example.com`, `*.example.com`, optionally `:port`."""

    host: str
    port: int | None
    wildcard: bool

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"*.{host}" if self.wildcard else host
        return text if self.port is None else f"{text}:{self.port}"


def parse_host_rule(entry: str) -> HostRule:
    """Parse one allowlist entry; raise ValueError naming it when malformed."""
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"allow_hosts entry {entry!r} must be a non-empty host name string")
    text = entry.strip().lower()
    if "/" in text or "@" in text:
        raise ValueError(
            f"allow_hosts entry {entry!r} must be a host such as 'example.com', "
            "'*.example.com' or 'example.com:8080', not a URL"
        )
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"allow_hosts entry {entry!r} has a bad port: {exc}") from None
    if not host or "*" in host:
        raise ValueError(
            f"allow_hosts entry {entry!r} is not a host name; wildcards are only "
            "allowed as a leading '*.' (e.g. '*.example.com')"
        )
    return HostRule(host.rstrip("."), port, wildcard)


def parse_allow_hosts(allow_hosts: Iterable[str]) -> tuple[HostRule, ...]:
    """Parse the whole allowlist; a bare string is refused (it would iterate by character)."""
    if isinstance(allow_hosts, str):
        raise TypeError(
            f"allow_hosts must be a list of hosts, got the string {allow_hosts!r}; "
            f"write [{allow_hosts!r}]"
        )
    rules = tuple(parse_host_rule(entry) for entry in allow_hosts)
    if not rules:
        raise ValueError("allow_hosts is empty: pass at least one host, e.g. ['example.com']")
    return rules


def check_url(url: URL, rules: tuple[HostRule, ...]) -> None:
    """Raise ToolError unless `url` is http(s) and its host:port is on the allowlist."""
    if not url.scheme:
        raise ToolError(f"{str(url)!r} is not a full URL; include the scheme, e.g. 'https://{url}'")
    if url.scheme not in DEFAULT_PORTS:
        raise ToolError(
            f"only http and https URLs can be fetched; got scheme {url.scheme!r} in {str(url)!r}"
        )
    host = (url.host or "").lower().rstrip(".")
    if not host:
        raise ToolError(f"URL {str(url)!r} has no host; give a full URL such as https://example.com/page")
    port = url.port or DEFAULT_PORTS[url.scheme]
    if not any(rule.matches(host, port) for rule in rules):
        allowed = ", ".join(str(rule) for rule in rules)
        raise ToolError(f"host {host!r} (port {port}) is not allowed; allowed hosts: {allowed}")


def is_text(mimetype: str) -> bool:
    """True for content types worth showing to the model as text."""
    return (
        mimetype.startswith("text/")
        or mimetype in TEXT_TYPES
        or mimetype.endswith(("+json", "+xml"))
    )


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int) -> tuple[bytes, bool]:
    """Read at most `max_bytes` of the body; the flag says whether more was left."""
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        buf += chunk
        if len(buf) > max_bytes:
            return bytes(buf[:max_bytes]), True
    return bytes(buf), False


def decode(body: bytes, charset: str | None, final: bool) -> str:
    """Decode with the response charset, falling back to UTF-8; bad bytes become U+FFFD."""
    try:
        decoder = codecs.getincrementaldecoder(charset or "utf-8")(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return decoder.decode(body, final=final)  # final=False drops a character cut in half


async def render(resp: aiohttp.ClientResponse, url: URL, redirected: bool,
                 max_bytes: int, max_chars: int | None) -> str:
    """Status line, content type, then the (capped) body or a note for binary content."""
    lines = [f"HTTP {resp.status} {resp.reason or ''}".rstrip()]
    if redirected:
        lines.append(f"URL: {url}")
    declared = resp.headers.get("Content-Type")
    lines.append(f"Content-Type: {declared or 'not given'}")
    if declared and not is_text(resp.content_type):
        size = resp.headers.get("Content-Length")
        size_text = f"{int(size):,} bytes" if size and size.isdigit() else "size unknown"
        return "\n".join(lines) + f"\n\n[binary content ({resp.content_type}, {size_text}) not shown]"
    body, truncated = await read_capped(resp, max_bytes)
    if not declared and b"\x00" in body[:4096]:
        return "\n".join(lines) + f"\n\n[binary content ({len(body):,}+ bytes, no content type) not shown]"
    text = decode(body, resp.charset, final=not truncated)
    notes = [f"[truncated at {max_bytes} bytes]"] if truncated else []
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars]
        notes.append(f"[truncated at {max_chars} chars]")
    return "\n".join([*lines, "", text, *notes])


async def fetch_url(raw_url: str, rules: tuple[HostRule, ...], max_bytes: int,
                    max_chars: int | None) -> str:
    """GET `raw_url`, following up to MAX_REDIRECTS redirects, each checked against `rules`."""
    import aiohttp
    from yarl import URL

    try:
        url = URL(raw_url)
    except (ValueError, TypeError) as exc:
        raise ToolError(f"could not parse URL {raw_url!r}: {exc}") from None
    check_url(url, rules)
    async with aiohttp.ClientSession(headers={"User-Agent": USER_AGENT}) as session:
        for hop in range(MAX_REDIRECTS + 1):
            async with session.get(url, allow_redirects=False) as resp:
                location = resp.headers.get("Location")
                if resp.status not in REDIRECT_STATUSES or not location:
                    return await render(resp, url, hop > 0, max_bytes, max_chars)
            try:
                url = url.join(URL(location))
            except ValueError as exc:
                raise ToolError(f"{url} redirected to a bad URL {location!r}: {exc}") from None
            check_url(url, rules)
    raise ToolError(f"too many redirects (more than {MAX_REDIRECTS}) starting from {raw_url}")


def http_fetch(allow_hosts: Iterable[str], *, max_bytes: int = 200_000,
               timeout: float = 10.0, name: str = "fetch") -> Tool:
    """Build a tool that GETs http(s) URLs on allowed hosts and returns the text.

    `allow_hosts` entries are exact hosts (`example.com`, any port), wildcards
    (`*.example.com`: subdomains only, not the bare domain) or `host:port`.
    The body is cut at `max_bytes`; the whole fetch, redirects included, must
    finish within `timeout` seconds. Non-2xx responses are returned as text
    with their status; refusals, timeouts and network errors are ToolErrors.

    Example:
        >>> fetch = http_fetch(["docs.python.org", "*.readthedocs.io"], max_bytes=50_000)
        >>> fetch.name
        'fetch'
        >>> # text = await fetch(url="https://docs.python.org/3/")  # "HTTP 200 OK\\n..."
    """
    rules = parse_allow_hosts(allow_hosts)
    if not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
    allowed = ", ".join(str(rule) for rule in rules)

    async def fetch(url: str, max_chars: int | None = None) -> str:
        """Fetch a URL.

        Args:
            url: Full http or https URL to GET.
            max_chars: Optional cap on the characters of body text returned.
        """
        import aiohttp

        if max_chars is not None and max_chars < 1:
            raise ToolError(f"max_chars must be at least 1, got {max_chars}; omit it for no cap")
        try:
            async with asyncio.timeout(timeout):
                return await fetch_url(url, rules, max_bytes, max_chars)
        except TimeoutError:
            raise ToolError(f"timed out after {timeout:g} s fetching {url}") from None
        except (aiohttp.ClientError, OSError) as exc:  # refused connection, DNS failure, bad reply
            raise ToolError(f"could not fetch {url}: {type(exc).__name__}: {exc}") from None

    description = (
        f"HTTP GET a web page or API URL and return its status, content type and text "
        f"(at most {max_bytes:,} bytes; binary content is described, not shown). "
        f"Only these hosts are allowed: {allowed}."
    )
    return tool(fetch, name=name, description=description, timeout=timeout + 5.0,
                side_effects=False)
