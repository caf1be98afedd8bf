"""Money without floats.

Amounts are ``Decimal`` in code and integer nano-dollars (1e-9 USD) in the
store: LLM token prices go down to fractions of a micro-dollar (gpt-4o-mini
input is $0.15 per million tokens = 150 nano-dollars a token), so nanos keep
every shipped price exact while sums stay plain SQL integers.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation

NANOS_PER_USD = 1_000_000_000

# ISO 4217 currencies whose minor unit is the whole unit (Stripe's list).
ZERO_DECIMAL = frozenset(
    ["BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV", "XAF", "XOF", "XPF"]
)
# Currencies with three decimals (Stripe: BHD JOD KWD OMR TND).
THREE_DECIMAL = frozenset(["BHD", "JOD", "KWD", "OMR", "TND"])


class Unpriceable(ValueError):
    """Money in a currency the policy has no ``fx`` rate for."""

    def __init__(self, currency: str) -> None:
        super().__init__(f"no fx rate for currency {currency!r}; add it under fx: in the policy")
        self.currency = currency


def decimals(currency: str) -> int:
    """Number of decimals of ``currency``'s minor unit."""
    cur = currency.upper()
    if cur in ZERO_DECIMAL:
        return 0
    if cur in THREE_DECIMAL:
        return 3
    return 2


def from_minor(amount: int | str | Decimal, currency: str) -> Decimal:
    """Convert minor units (Stripe's ``amount``) to a Decimal in major units."""
    return Decimal(amount).scaleb(-decimals(currency))


def to_usd(amount: Decimal, currency: str, fx: Mapping[str, Decimal]) -> Decimal:
    """Convert ``amount`` of ``currency`` (major units) to USD.

    ``fx`` maps currency codes to USD per unit. Raises :class:`Unpriceable`
    when the currency is unknown: refusing is safer than guessing.
    """
    cur = currency.upper()
    if cur == "USD":
        return amount
    rate = fx.get(cur)
    if rate is None:
        raise Unpriceable(cur)
    return amount * rate


def parse_decimal(value: object) -> Decimal | None:
    """Parse a JSON number or decimal string exactly; ``None`` if it is not one.

    Floats are converted through ``str`` so 0.1 stays 0.1. Booleans, NaN and
    infinities are rejected.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        value = repr(value)
    if not isinstance(value, (int, str, Decimal)):
        return None
    try:
        d = Decimal(value)
    except (InvalidOperation, ValueError):
        return None
    return d if d.is_finite() else None


def to_nanos(usd: Decimal | int) -> int:
    """USD → integer nano-dollars (banker's rounding below one nano-dollar)."""
    return int((Decimal(usd) * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_nanos(nanos: int) -> Decimal:
    """Integer nano-dollars → USD Decimal, normalised for display."""
    d = Decimal(nanos).scaleb(-9)
    return d.quantize(Decimal(1)) if d == d.to_integral_value() else d.normalize()


def plain(amount: Decimal | int) -> str:
    """An exact decimal string without exponent notation (``0.000000285``, never ``2.85E-7``)."""
    return format(Decimal(amount), "f")


def fmt_usd(usd: Decimal | None) -> str:
    """A human string: ``$12.50``, ``$0.000285``, ``-`` for unknown."""
    if usd is None:
        return "-"
    if usd == 0:
        return "$0.00"
    q = usd.quantize(Decimal("0.01"))
    if q == usd:
        return f"${q:,}"
    return f"${usd.normalize():f}"
