"""Helpers the benchmarks' report code shares (imported by the python that
bench/*.sh runs; not a program of its own)."""
import math
import statistics

# Format of figures when a call gives none; a script may change it.
SPEC = ".1f"


def f(x):
    """x as a float, or None if it is not a number (or NaN)."""
    try:
        v = float(x)
        return None if math.isnan(v) else v
    except (TypeError, ValueError):
        return None


def med(xs):
    """Median of the numbers in xs (None entries left out), or None."""
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec=None):
    """v formatted, "-" for None."""
    return "-" if v is None else format(v, spec or SPEC)


def mr(xs, spec=None):
    """median [min..max] of xs (None entries left out), "-" if empty."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return fmt(xs[0], spec)
    return f"{fmt(statistics.median(xs), spec)} [{fmt(min(xs), spec)}..{fmt(max(xs), spec)}]"
