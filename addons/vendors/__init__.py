"""The vendor registry: every module in this package that defines ``VENDOR``.

Adding a vendor is adding one module here (plus its fixtures and tests);
nothing else in the gateway names vendors.
"""

from __future__ import annotations

import importlib
import operator
import pkgutil

from .base import Vendor

REGISTRY: dict[str, Vendor] = {}

for _info in pkgutil.iter_modules(__path__):
    if _info.name == "base" or _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    # a module defines VENDOR, or VENDORS for several built on one mechanism (compatible.py)
    for _vendor in (getattr(_module, "VENDOR", None), *getattr(_module, "VENDORS", ())):
        if isinstance(_vendor, Vendor):
            REGISTRY[_vendor.name] = _vendor


def vendor_for_host(host: str) -> Vendor | None:
    """The vendor serving ``host`` (a CONNECT target or SNI), if any."""
    global _registered
    registered = tuple(REGISTRY.values())  # (vendors are frozen: the registry's members are its state)
    if len(registered) != len(_registered) or not all(map(operator.is_, registered, _registered)):
        _by_host.clear()
        _registered = registered
    try:
        return _by_host[host]
    except KeyError:
        pass
    found = next((vendor for vendor in registered if vendor.serves(host)), None)
    if len(_by_host) >= 4096:  # (hosts come from agents: bounded)
        _by_host.clear()
    _by_host[host] = found
    return found


# The answers for the hosts asked about (a request asks three or four times), for the registry as
# it was: any change to REGISTRY (a policy file declaring vendors, a test) starts them afresh.
_by_host: dict[str, Vendor | None] = {}
_registered: tuple[Vendor, ...] = ()


# The vendors shipped as code; REGISTRY also holds those the policy file in force declares.
BUILT_IN: dict[str, Vendor] = dict(REGISTRY)


def install_declared(declared: dict[str, Vendor]) -> None:
    """Make ``declared`` (a loaded policy file's vendors) the declared vendors in REGISTRY."""
    for name in [n for n in REGISTRY if n not in BUILT_IN]:
        del REGISTRY[name]
    REGISTRY.update({n: v for n, v in declared.items() if n not in BUILT_IN})
