"""Which browsers and hosts a server answers (CSRF and DNS-rebinding defences)."""
import ipaddress
from dataclasses import dataclass

LOCAL_NAMES = ("localhost",)


@dataclass
class Access:
    """Which browsers' requests a server answers. A page the user visits may send requests to
    127.0.0.1 too: under its own origin (refused by the Origin check), or under a DNS name of its
    own that it re-points at 127.0.0.1 (DNS rebinding: refused by the Host check, since only IP
    literals, localhost and the names given here are answered)."""
    bound_host: str = "127.0.0.1"
    allow_origins: tuple = ()  # origins (https://app.example) whose pages may call; "*": any
    allow_hosts: tuple = ()  # more names the server is reached by; "*": any

    def host_allowed(self, host) -> bool:
        if host is None or "*" in self.allow_hosts:  # browsers always send a Host
            return True
        name = host_name(host)
        if name in LOCAL_NAMES or name == self.bound_host.lower() or name in self.allow_hosts:
            return True
        try:
            ipaddress.ip_address(name)
            return True  # an IP literal: no DNS answer can re-point it
        except ValueError:
            return False

    def origin_listed(self, origin) -> bool:
        return origin is not None and ("*" in self.allow_origins or origin in self.allow_origins)

    def origin_allowed(self, origin, host) -> bool:
        return origin is None or origin == f"http://{host}" or self.origin_listed(origin)


def host_name(host: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


