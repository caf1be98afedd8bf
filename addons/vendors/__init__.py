"""The vendor registry: every module in this package that defines ``VENDOR``.

Adding a vendor is adding one module here (plus its fixtures and tests);
nothing else in the gateway names vendors.
"""

from __future__ import annotations

import importlib
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
    for vendor in REGISTRY.values():
        if vendor.serves(host):
            return vendor
    return None


# The vendors shipped as code; REGISTRY also holds those the policy file in force declares.
BUILT_IN: dict[str, Vendor] = dict(REGISTRY)


def install_declared(declared: dict[str, Vendor]) -> None:
    """Make ``declared`` (a loaded policy file's vendors) the declared vendors in REGISTRY."""
    for name in [n for n in REGISTRY if n not in BUILT_IN]:
        del REGISTRY[name]
    REGISTRY.update({n: v for n, v in declared.items() if n not in BUILT_IN})
