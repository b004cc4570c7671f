"""How often math-verify agrees with exact sympy comparison, and with the truth, on 500 generated answer pairs.

Pairs are generated from a seed over eleven families (integers, fractions, decimals, radicals, pi, intervals, sets,
tuples, percentages, scientific notation, negative numbers), half written as equal forms of one value (a/b and
\\frac{a}{b}, 0.5 and \\frac{1}{2}, \\sqrt{8} and 2\\sqrt{2}, {1,2} and {2,1}, ...) and half as near misses (another
numerator, an open bracket for a closed one, a missing element, a decimal cut after six digits, ...). Each pair's label
comes from its construction and means exact equality of value, with one reading per family: (a, b) is an interval in
the intervals family and an ordered pair in the tuples family, p% is the number p/100, a decimal is the exact value
it writes (0.333333 is not 1/3; 0.\\overline{3} is).

Each pair is compared three ways, and a fourth that splits math-verify's misses into parsing and comparing:
- math-verify: `verify(parse(gold), parse(answer))`, gold first, both wrapped in $...$ (or \\boxed{} with --wrap
  boxed), the library's defaults (its SIGALRM timeouts of 5 s; this runs in the main thread). An exception is an
  "error"; timeouts and errors the library logs and swallows are counted apart.
- sympy (plain): each answer is also written by the generator as a plain sympy expression that transcribes the LaTeX
  (0.\\overline{3} as 0.[3], (1,5] as Interval(1, 5, True, False), 25\\% as 25/100, 2.4e-4 as 2.4e-4), parsed with
  `parse_expr(..., standard_transformations + (rationalize,))` so decimals stay exact, and compared exactly:
  simplify(a - b) == 0 for numbers, element-wise for tuples, an empty symmetric difference for sets and intervals.
  Its inputs come from the generator, so it checks the comparison and the labels, not a LaTeX parser.
- the construction label.
- latex2sympy + exact: the LaTeX parsed by math-verify's own parser (latex2sympy2_extended, called directly), floats
  made the rationals they write, then the same exact comparison. Where it is right and math-verify wrong, the miss
  is math-verify's comparison (tolerances, leniencies) or its extraction; where both are wrong, the parser.
Errors (an exception, or over 10 s by our own SIGALRM for the two sympy methods) are counted per pair as "error".

    PYTHONPATH=src .venv/bin/python bench/math_verify_agreement.py         # --json for the figures; ~25 s on 1 core
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import sympy
from sympy.parsing.sympy_parser import parse_expr, rationalize, standard_transformations

SEED = 0
PAIRS = 500
TRANSFORMS = (*standard_transformations, rationalize)
SQUARE_FREE = [2, 3, 5, 6, 7, 10, 11]


@dataclass
class Pair:
    family: str
    variant: str
    gold: str  # LaTeX, as an author or a solver writes it
    answer: str
    gold_plain: str  # the same, transcribed as a sympy expression
    answer_plain: str
    label: bool


# ---- writing numbers ----


def tex_frac(f: Fraction, style: str = r"\frac") -> str:
    sign = "-" if f < 0 else ""
    f = abs(f)
    if f.denominator == 1:
        return f"{sign}{f.numerator}"
    return f"{sign}{style}{{{f.numerator}}}{{{f.denominator}}}"


def plain_frac(f: Fraction) -> str:
    return str(f.numerator) if f.denominator == 1 else f"({f.numerator})/({f.denominator})"


def decimal_str(f: Fraction) -> str:
    """The exact decimal of a fraction whose denominator has only the factors 2 and 5."""
    sign = "-" if f < 0 else ""
    f = abs(f)
    digits = 0
    while (f * 10**digits).denominator != 1:
        digits += 1
    whole, rest = divmod((f * 10**digits).numerator, 10**digits)
    return f"{sign}{whole}" if digits == 0 else f"{sign}{whole}.{rest:0{digits}d}"


def repeating(f: Fraction) -> tuple[str, str, str]:
    """(whole, non-repeating digits, repeating digits) of a positive fraction."""
    whole, rem = divmod(f.numerator, f.denominator)
    digits, seen = "", {}
    while rem and rem not in seen:
        seen[rem] = len(digits)
        rem *= 10
        digits += str(rem // f.denominator)
        rem %= f.denominator
    if not rem:
        return str(whole), digits, ""
    start = seen[rem]
    return str(whole), digits[:start], digits[start:]


def truncated(f: Fraction, places: int) -> str:
    value = math.floor(f * 10**places)
    return f"{value // 10**places}.{value % 10**places:0{places}d}"


def rounded(x: float, places: int) -> str:
    return f"{x:.{places}f}"


def some_fraction(rng: random.Random, denominators: list[int] | None = None, periodic: bool = False) -> Fraction:
    """A positive non-integer fraction, in lowest terms; with periodic, one whose decimal never ends."""
    while True:
        den = rng.choice(denominators or list(range(2, 13)))
        f = Fraction(rng.randint(1, 3 * den), den)
        if f.denominator > 1 and (not periodic or repeating(f)[2]):
            return f


# ---- families: each variant returns (gold, answer, gold_plain, answer_plain) ----

Variant = Callable[[random.Random], tuple[str, str, str, str]]


def integers() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def n(rng):
        return rng.randint(2, 999)

    def thousands(rng):
        v = rng.randint(1_000, 999_999)
        return f"{v:,}".replace(",", "{,}"), str(v), str(v), str(v)

    def digit_swap(rng):
        while True:
            v = rng.randint(12, 999)
            s = str(v)
            w = s[:-2] + s[-1] + s[-2]
            if w != s and not w.startswith("0"):
                return s, w, s, w

    def written(answer: Callable[[int], str], plain: Callable[[int], str] | None = None) -> Variant:
        def variant(r):
            v = n(r)
            return str(v), answer(v), str(v), (plain or answer)(v)

        return variant

    equal = {
        "same": written(str),
        "n vs n.0": written(lambda v: f"{v}.0"),
        "n vs \\frac{2n}{2}": written(lambda v: f"\\frac{{{2 * v}}}{{2}}", lambda v: f"({2 * v})/(2)"),
        "thousands separator {,}": thousands,
    }
    unequal = {
        "off by one": written(lambda v: str(v + 1)),
        "last digits swapped": digit_swap,
        "times ten": written(lambda v: str(10 * v)),
        "n vs n.5": written(lambda v: f"{v}.5"),
    }
    return equal, unequal


def fractions() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def slash(r):
        f = some_fraction(r)
        return tex_frac(f), f"{f.numerator}/{f.denominator}", plain_frac(f), plain_frac(f)

    def dfrac(r):
        f = some_fraction(r)
        return tex_frac(f), tex_frac(f, r"\dfrac"), plain_frac(f), plain_frac(f)

    def unreduced(r):
        f, k = some_fraction(r), r.randint(2, 6)
        return (
            tex_frac(f),
            f"\\frac{{{k * f.numerator}}}{{{k * f.denominator}}}",
            plain_frac(f),
            f"({k * f.numerator})/({k * f.denominator})",
        )

    def mixed(r):
        f = some_fraction(r)
        f = f if f > 1 else f + 1
        whole, part = divmod(f.numerator, f.denominator)
        rest = Fraction(part, f.denominator)
        return (
            tex_frac(f),
            f"{whole}\\frac{{{rest.numerator}}}{{{rest.denominator}}}",
            plain_frac(f),
            f"{whole} + {plain_frac(rest)}",
        )

    def other_numerator(r):
        f = some_fraction(r)
        n = f.numerator + (1 if f.numerator == 1 else r.choice([-1, 1]))
        return tex_frac(f), f"\\frac{{{n}}}{{{f.denominator}}}", plain_frac(f), f"({n})/({f.denominator})"

    def other_denominator(r):
        f = some_fraction(r)
        d = f.denominator + r.choice([-1, 1]) if f.denominator > 2 else 3
        return tex_frac(f), f"\\frac{{{f.numerator}}}{{{d}}}", plain_frac(f), f"({f.numerator})/({d})"

    def swapped(r):
        f = some_fraction(r)
        return (
            tex_frac(f),
            f"\\frac{{{f.denominator}}}{{{f.numerator}}}",
            plain_frac(f),
            f"({f.denominator})/({f.numerator})",
        )

    equal = {"\\frac{a}{b} vs a/b": slash, "\\frac vs \\dfrac": dfrac, "unreduced": unreduced, "mixed number": mixed}
    unequal = {"other numerator": other_numerator, "other denominator": other_denominator, "swapped": swapped}
    return equal, unequal


def decimals() -> tuple[dict[str, Variant], dict[str, Variant]]:
    terminating = [2, 4, 5, 8, 10, 20, 25]
    periodic = [3, 6, 7, 9, 11, 12]

    def exact(r):
        f = some_fraction(r, terminating)
        return tex_frac(f), decimal_str(f), plain_frac(f), decimal_str(f)

    def trailing_zero(r):
        f = some_fraction(r, terminating)
        return decimal_str(f), decimal_str(f) + "0", decimal_str(f), decimal_str(f) + "0"

    def overline(r):
        f = some_fraction(r, periodic, periodic=True)
        whole, head, rep = repeating(f)
        return tex_frac(f), f"{whole}.{head}\\overline{{{rep}}}", plain_frac(f), f"{whole}.{head}[{rep}]"

    def cut(places: int, how: str) -> Variant:
        def variant(r):
            f = some_fraction(r, periodic, periodic=True)
            text = truncated(f, places) if how == "cut" else rounded(float(f), places)
            return tex_frac(f), text, plain_frac(f), text

        return variant

    def changed_digit(r):
        f = some_fraction(r, terminating)
        g = f + Fraction(r.choice([-1, 1]), 10 ** max(1, len(decimal_str(f).split(".")[1])))
        return tex_frac(f), decimal_str(g), plain_frac(f), decimal_str(g)

    equal = {"terminating decimal": exact, "trailing zero": trailing_zero, "repeating, \\overline": overline}
    unequal = {
        "periodic cut after 6 digits": cut(6, "cut"),
        "periodic rounded to 4 digits": cut(4, "round"),
        "periodic cut after 2 digits": cut(2, "cut"),
        "last digit changed": changed_digit,
    }
    return equal, unequal


def radicals() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def km(r):
        return r.randint(2, 5), r.choice(SQUARE_FREE)

    def pulled_out(r):
        k, m = km(r)
        return f"\\sqrt{{{k * k * m}}}", f"{k}\\sqrt{{{m}}}", f"sqrt({k * k * m})", f"{k}*sqrt({m})"

    def rationalized(r):
        m = r.choice(SQUARE_FREE)
        return f"\\frac{{\\sqrt{{{m}}}}}{{{m}}}", f"\\frac{{1}}{{\\sqrt{{{m}}}}}", f"sqrt({m})/{m}", f"1/sqrt({m})"

    def product(r):
        m, n = r.sample(SQUARE_FREE, 2)
        return f"\\sqrt{{{m}}}\\sqrt{{{n}}}", f"\\sqrt{{{m * n}}}", f"sqrt({m})*sqrt({n})", f"sqrt({m * n})"

    def cube_root(r):
        k = r.randint(2, 6)
        return f"\\sqrt[3]{{{k**3}}}", str(k), f"({k**3})**(1/3)", str(k)

    def conjugate(r):
        m = r.choice(SQUARE_FREE)
        return (
            f"\\frac{{1}}{{\\sqrt{{{m}}}+1}}",
            f"\\frac{{\\sqrt{{{m}}}-1}}{{{m - 1}}}",
            f"1/(sqrt({m})+1)",
            f"(sqrt({m})-1)/({m - 1})",
        )

    def other_factor(r):
        k, m = km(r)
        return f"\\sqrt{{{k * k * m}}}", f"{k + 1}\\sqrt{{{m}}}", f"sqrt({k * k * m})", f"{k + 1}*sqrt({m})"

    def other_radicand(r):
        k = r.randint(2, 5)
        m, n = r.sample(SQUARE_FREE, 2)
        return f"{k}\\sqrt{{{m}}}", f"{k}\\sqrt{{{n}}}", f"{k}*sqrt({m})", f"{k}*sqrt({n})"

    def split_sum(r):
        a, b = r.sample([2, 3, 5, 7], 2)
        return f"\\sqrt{{{a + b}}}", f"\\sqrt{{{a}}}+\\sqrt{{{b}}}", f"sqrt({a + b})", f"sqrt({a})+sqrt({b})"

    def approx(r):
        k, m = km(r)
        text = rounded(k * math.sqrt(m), 6)
        return f"{k}\\sqrt{{{m}}}", text, f"{k}*sqrt({m})", text

    equal = {
        "\\sqrt{k^2 m} vs k\\sqrt{m}": pulled_out,
        "\\sqrt{m}/m vs 1/\\sqrt{m}": rationalized,
        "\\sqrt{m}\\sqrt{n} vs \\sqrt{mn}": product,
        "cube root": cube_root,
        "conjugate": conjugate,
    }
    unequal = {
        "other factor": other_factor,
        "other radicand": other_radicand,
        "\\sqrt{a+b} vs \\sqrt{a}+\\sqrt{b}": split_sum,
        "6-place decimal": approx,
    }
    return equal, unequal


def pis() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def kd(r):
        f = Fraction(r.randint(1, 7), r.choice([1, 2, 3, 4, 6, 8, 12]))
        return f.numerator, f.denominator

    def pi_tex(k, d):
        top = "\\pi" if k == 1 else f"{k}\\pi"
        return top if d == 1 else f"\\frac{{{top}}}{{{d}}}"

    def pi_plain(k, d):
        return f"{k}*pi/{d}"

    def coefficient_apart(r):
        k, d = kd(r)
        coef = str(k) if d == 1 else f"\\frac{{{k}}}{{{d}}}"
        return pi_tex(k, d), f"{coef}\\pi", pi_plain(k, d), f"({k})/({d})*pi"

    def pi_first(r):
        k, d = kd(r)
        text = f"\\pi \\cdot {k}" if d == 1 else f"\\pi \\cdot \\frac{{{k}}}{{{d}}}"
        return pi_tex(k, d), text, pi_plain(k, d), f"pi*({k})/({d})"

    def slash(r):
        k, d = kd(r)
        d = d if d > 1 else 2
        top = "\\pi" if k == 1 else f"{k}\\pi"
        return pi_tex(k, d), f"{top}/{d}", pi_plain(k, d), pi_plain(k, d)

    def unreduced(r):
        k, d = kd(r)
        return pi_tex(k, d), f"\\frac{{{2 * k}\\pi}}{{{2 * d}}}", pi_plain(k, d), pi_plain(2 * k, 2 * d)

    def other_multiple(r):
        k, d = kd(r)
        return pi_tex(k, d), pi_tex(k + 1, d), pi_plain(k, d), pi_plain(k + 1, d)

    def other_denominator(r):
        k, d = kd(r)
        e = d * 2
        return pi_tex(k, d), pi_tex(k, e), pi_plain(k, d), pi_plain(k, e)

    def approx(places: int) -> Variant:
        def variant(r):
            k, d = kd(r)
            text = rounded(k * math.pi / d, places)
            return pi_tex(k, d), text, pi_plain(k, d), text

        return variant

    equal = {
        "coefficient apart": coefficient_apart,
        "\\pi first": pi_first,
        "k\\pi/d": slash,
        "unreduced": unreduced,
    }
    unequal = {
        "other multiple": other_multiple,
        "other denominator": other_denominator,
        "2-place decimal": approx(2),
        "6-place decimal": approx(6),
    }
    return equal, unequal


def interval_tex(a: str, b: str, left_open: bool, right_open: bool, spaced: bool = False) -> str:
    sep = ", " if spaced else ","
    return f"{'(' if left_open else '['}{a}{sep}{b}{')' if right_open else ']'}"


def interval_plain(a: str, b: str, left_open: bool, right_open: bool) -> str:
    return f"Interval({a}, {b}, {left_open}, {right_open})"


def intervals() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def ab(r):
        a = r.randint(-9, 8)
        return a, r.randint(a + 1, 12)

    def ends(r):
        return r.random() < 0.5, r.random() < 0.5

    def spacing(r):
        (a, b), (lo, ro) = ab(r), ends(r)
        return (
            interval_tex(str(a), str(b), lo, ro), interval_tex(str(a), str(b), lo, ro, spaced=True),
            interval_plain(str(a), str(b), lo, ro), interval_plain(str(a), str(b), lo, ro),
        )  # fmt: skip

    def left_right(r):
        (a, b), (lo, ro) = ab(r), ends(r)
        tex = f"\\left{'(' if lo else '['} {a}, {b} \\right{')' if ro else ']'}"
        return (
            interval_tex(str(a), str(b), lo, ro),
            tex,
            interval_plain(str(a), str(b), lo, ro),
            interval_plain(str(a), str(b), lo, ro),
        )

    def fraction_end(r):
        f = some_fraction(r, [2, 4, 5])
        b, (lo, ro) = math.ceil(f) + r.randint(1, 5), ends(r)
        return (
            interval_tex(tex_frac(f), str(b), lo, ro), interval_tex(decimal_str(f), str(b), lo, ro),
            interval_plain(plain_frac(f), str(b), lo, ro), interval_plain(decimal_str(f), str(b), lo, ro),
        )  # fmt: skip

    def infinite(r):
        a = r.randint(-9, 9)
        closed = r.random() < 0.5
        if r.random() < 0.5:
            t = interval_tex("-\\infty", str(a), True, not closed)
            return (
                t,
                t.replace(",", ", "),
                interval_plain("-oo", str(a), True, not closed),
                interval_plain("-oo", str(a), True, not closed),
            )
        t = interval_tex(str(a), "\\infty", not closed, True)
        return (
            t,
            t.replace(",", ", "),
            interval_plain(str(a), "oo", not closed, True),
            interval_plain(str(a), "oo", not closed, True),
        )

    def adjacent_union(r):
        a, b = ab(r)
        b += 2
        c = r.randint(a + 1, b - 1)
        return (
            f"[{a},{b}]", f"[{a},{c}]\\cup[{c},{b}]",
            interval_plain(str(a), str(b), False, False),
            f"Union({interval_plain(str(a), str(c), False, False)}, {interval_plain(str(c), str(b), False, False)})",
        )  # fmt: skip

    def union_order(r):
        a, b = ab(r)
        left, right = f"(-\\infty,{a})", f"({b},\\infty)"
        plain = f"Union(Interval(-oo, {a}, True, True), Interval({b}, oo, True, True))"
        return f"{left}\\cup{right}", f"{right}\\cup{left}", plain, plain

    def bracket_flip(r):
        (a, b), (lo, ro) = ab(r), ends(r)
        left = r.random() < 0.5
        lo2, ro2 = (not lo, ro) if left else (lo, not ro)
        return (
            interval_tex(str(a), str(b), lo, ro), interval_tex(str(a), str(b), lo2, ro2),
            interval_plain(str(a), str(b), lo, ro), interval_plain(str(a), str(b), lo2, ro2),
        )  # fmt: skip

    def open_vs_closed(r):
        a, b = ab(r)
        return (
            interval_tex(str(a), str(b), True, True), interval_tex(str(a), str(b), False, False),
            interval_plain(str(a), str(b), True, True), interval_plain(str(a), str(b), False, False),
        )  # fmt: skip

    def other_end(r):
        (a, b), (lo, ro) = ab(r), ends(r)
        c = b + r.choice([1, 2])
        return (
            interval_tex(str(a), str(b), lo, ro), interval_tex(str(a), str(c), lo, ro),
            interval_plain(str(a), str(b), lo, ro), interval_plain(str(a), str(c), lo, ro),
        )  # fmt: skip

    def union_with_gap(r):
        a, b = ab(r)
        b += 2
        c = r.randint(a + 1, b - 1)
        return (
            f"[{a},{b}]", f"[{a},{c})\\cup({c},{b}]", interval_plain(str(a), str(b), False, False),
            f"Union({interval_plain(str(a), str(c), False, True)}, {interval_plain(str(c), str(b), True, False)})",
        )  # fmt: skip

    equal = {
        "spacing": spacing,
        "\\left( \\right]": left_right,
        "fraction vs decimal endpoint": fraction_end,
        "infinite end, spacing": infinite,
        "adjacent union": adjacent_union,
        "union order": union_order,
    }
    unequal = {
        "one bracket flipped": bracket_flip,
        "(a,b) vs [a,b]": open_vs_closed,
        "other endpoint": other_end,
        "union with a gap": union_with_gap,
    }
    return equal, unequal


def set_tex(items: list[str], spaced: bool = False) -> str:
    return "\\{" + (", " if spaced else ",").join(items) + "\\}"


def set_plain(items: list[str]) -> str:
    return f"FiniteSet({', '.join(items)})"


def sets() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def elems(r, size=None):
        return [str(v) for v in r.sample(range(-5, 20), size or r.randint(2, 5))]

    def reordered(r):
        xs = elems(r)
        ys = xs[::-1] if len(xs) == 2 else r.sample(xs, len(xs))
        ys = ys if ys != xs else xs[1:] + xs[:1]
        return set_tex(xs), set_tex(ys), set_plain(xs), set_plain(ys)

    def repeated(r):
        xs = elems(r)
        ys = [*xs, r.choice(xs)]
        return set_tex(xs), set_tex(ys), set_plain(xs), set_plain(ys)

    def spacing(r):
        xs = elems(r)
        return set_tex(xs), set_tex(xs, spaced=True), set_plain(xs), set_plain(xs)

    def fraction_elem(r):
        xs, f = elems(r, r.randint(1, 3)), some_fraction(r, [2, 4, 5])
        return (
            set_tex([tex_frac(f), *xs]), set_tex([*xs, decimal_str(f)]),
            set_plain([plain_frac(f), *xs]), set_plain([*xs, decimal_str(f)]),
        )  # fmt: skip

    def left_right(r):
        xs = elems(r)
        return set_tex(xs), "\\left\\{" + ", ".join(xs) + "\\right\\}", set_plain(xs), set_plain(xs)

    def missing(r):
        xs = elems(r)
        ys = r.sample(xs, len(xs) - 1)
        return set_tex(xs), set_tex(ys), set_plain(xs), set_plain(ys)

    def extra(r):
        xs = elems(r)
        new = next(str(v) for v in r.sample(range(-5, 30), 35) if str(v) not in xs)
        ys = [*xs, new]
        return set_tex(xs), set_tex(ys), set_plain(xs), set_plain(ys)

    def changed(r):
        xs = elems(r)
        i = r.randrange(len(xs))
        new = next(str(v) for v in r.sample(range(-5, 30), 35) if str(v) not in xs)
        ys = [*xs[:i], new, *xs[i + 1 :]]
        return set_tex(xs), set_tex(ys), set_plain(xs), set_plain(ys)

    equal = {
        "reordered": reordered,
        "repeated element": repeated,
        "spacing": spacing,
        "fraction vs decimal element": fraction_elem,
        "\\left\\{ \\right\\}": left_right,
    }
    unequal = {"missing element": missing, "extra element": extra, "one element changed": changed}
    return equal, unequal


def tuples() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def elems(r, size=None):
        return [str(v) for v in r.sample(range(-6, 15), size or r.choice([2, 2, 3]))]

    def tex(items, spaced=False):
        return "(" + (", " if spaced else ",").join(items) + ")"

    def plain(items):
        return f"Tuple({', '.join(items)})"

    def spacing(r):
        xs = elems(r)
        return tex(xs), tex(xs, spaced=True), plain(xs), plain(xs)

    def fraction_elem(r):
        xs, f = elems(r), some_fraction(r, [2, 4, 5])
        i = r.randrange(len(xs))
        g, a = [*xs[:i], tex_frac(f), *xs[i + 1 :]], [*xs[:i], decimal_str(f), *xs[i + 1 :]]
        return tex(g), tex(a), plain([*xs[:i], plain_frac(f), *xs[i + 1 :]]), plain(a)

    def left_right(r):
        xs = elems(r)
        return tex(xs), "\\left(" + ", ".join(xs) + "\\right)", plain(xs), plain(xs)

    def unreduced(r):
        xs, f, k = elems(r), some_fraction(r), r.randint(2, 4)
        i = r.randrange(len(xs))
        g = [*xs[:i], tex_frac(f), *xs[i + 1 :]]
        a = [*xs[:i], f"\\frac{{{k * f.numerator}}}{{{k * f.denominator}}}", *xs[i + 1 :]]
        return (
            tex(g),
            tex(a),
            plain([*xs[:i], plain_frac(f), *xs[i + 1 :]]),
            plain([*xs[:i], f"({k * f.numerator})/({k * f.denominator})", *xs[i + 1 :]]),
        )

    def swapped(r):
        xs = elems(r, 2)
        return tex(xs), tex(xs[::-1]), plain(xs), plain(xs[::-1])

    def changed(r):
        xs = elems(r)
        i = r.randrange(len(xs))
        ys = [*xs[:i], str(int(xs[i]) + r.choice([-1, 1])), *xs[i + 1 :]]
        return tex(xs), tex(ys), plain(xs), plain(ys)

    def missing(r):
        xs = elems(r, 3)
        return tex(xs), tex(xs[:2]), plain(xs), plain(xs[:2])

    def as_set(r):
        xs = elems(r)
        return tex(xs), set_tex(xs), plain(xs), set_plain(xs)

    equal = {
        "spacing": spacing,
        "fraction vs decimal component": fraction_elem,
        "\\left( \\right)": left_right,
        "unreduced component": unreduced,
    }
    unequal = {
        "swapped": swapped,
        "one component changed": changed,
        "missing component": missing,
        "tuple vs set": as_set,
    }
    return equal, unequal


def percentages() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def p(r):
        return Fraction(r.randint(1, 199), 2) if r.random() < 0.3 else Fraction(r.randint(1, 99))

    def pct(f):
        return f"{decimal_str(f)}\\%"

    def spacing(r):
        f = p(r)
        return pct(f), f"{decimal_str(f)} \\%", f"{decimal_str(f)}/100", f"{decimal_str(f)}/100"

    def as_decimal(r):
        f = p(r)
        return pct(f), decimal_str(f / 100), f"{decimal_str(f)}/100", decimal_str(f / 100)

    def as_fraction(r):
        f = p(r)
        return pct(f), tex_frac(f / 100), f"{decimal_str(f)}/100", plain_frac(f / 100)

    def bare(r):
        f = p(r)
        return pct(f), decimal_str(f), f"{decimal_str(f)}/100", decimal_str(f)

    def other(r):
        f = p(r)
        g = f + 1
        return pct(f), pct(g), f"{decimal_str(f)}/100", f"{decimal_str(g)}/100"

    def shifted(r):
        f = p(r)
        g = f / 1000 if r.random() < 0.5 else f / 10
        return pct(f), decimal_str(g), f"{decimal_str(f)}/100", decimal_str(g)

    equal = {"spacing": spacing, "p% vs decimal": as_decimal, "p% vs fraction": as_fraction}
    unequal = {"p% vs bare p": bare, "other percentage": other, "decimal point shifted": shifted}
    return equal, unequal


def scientific() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def me(r):
        mant = Fraction(r.randint(10, 99), 10) if r.random() < 0.7 else Fraction(r.randint(100, 999), 100)
        return mant, r.choice([-4, -3, -2, -1, 2, 3, 4, 5, 6, 7])

    def sci(mant, e, op="\\times"):
        return f"{decimal_str(mant)} {op} 10^{{{e}}}"

    def plain(mant, e):
        return f"{decimal_str(mant)}*10**({e})"

    def as_decimal(op: str) -> Variant:
        def variant(r):
            mant, e = me(r)
            value = decimal_str(mant * Fraction(10) ** e)
            return sci(mant, e, op), value, plain(mant, e), value

        return variant

    def cdot_form(r):
        mant, e = me(r)
        return sci(mant, e), sci(mant, e, "\\cdot"), plain(mant, e), plain(mant, e)

    def renormalized(r):
        mant, e = me(r)
        return sci(mant, e), sci(mant * 10, e - 1), plain(mant, e), plain(mant * 10, e - 1)

    def e_notation(r):
        mant, e = me(r)
        return sci(mant, e), f"{decimal_str(mant)}e{e}", plain(mant, e), f"{decimal_str(mant)}e{e}"

    def exponent_off(r):
        mant, e = me(r)
        f = e + r.choice([-1, 1])
        return sci(mant, e), sci(mant, f), plain(mant, e), plain(mant, f)

    def mantissa_changed(r):
        mant, e = me(r)
        other = mant + Fraction(1, 10)
        return sci(mant, e), sci(other, e), plain(mant, e), plain(other, e)

    def sign_flipped(r):
        mant, e = me(r)
        return sci(mant, e), sci(mant, -e), plain(mant, e), plain(mant, -e)

    equal = {
        "\\times 10^e vs decimal": as_decimal("\\times"),
        "\\cdot 10^e vs decimal": as_decimal("\\cdot"),
        "\\times vs \\cdot": cdot_form,
        "renormalized mantissa": renormalized,
        "e-notation": e_notation,
    }
    unequal = {
        "exponent off by one": exponent_off,
        "mantissa changed": mantissa_changed,
        "exponent sign flipped": sign_flipped,
    }
    return equal, unequal


def negatives() -> tuple[dict[str, Variant], dict[str, Variant]]:
    def minus_in_numerator(r):
        f = some_fraction(r)
        return (
            f"-{tex_frac(f)}",
            f"\\frac{{-{f.numerator}}}{{{f.denominator}}}",
            f"-{plain_frac(f)}",
            f"(-{f.numerator})/({f.denominator})",
        )

    def minus_in_denominator(r):
        f = some_fraction(r)
        return (
            f"-{tex_frac(f)}",
            f"\\frac{{{f.numerator}}}{{-{f.denominator}}}",
            f"-{plain_frac(f)}",
            f"({f.numerator})/(-{f.denominator})",
        )

    def decimal(r):
        f = some_fraction(r, [2, 4, 5, 8])
        return f"-{tex_frac(f)}", f"-{decimal_str(f)}", f"-{plain_frac(f)}", f"-{decimal_str(f)}"

    def unicode_minus(r):
        n = r.randint(1, 999)
        return f"-{n}", f"\u2212{n}", f"-{n}", f"-{n}"

    def parenthesized(r):
        n = r.randint(1, 999)
        return f"-{n}", f"-({n})", f"-{n}", f"-({n})"

    def sign_dropped(r):
        n = r.randint(1, 999)
        return f"-{n}", str(n), f"-{n}", str(n)

    def fraction_sign_dropped(r):
        f = some_fraction(r)
        return f"-{tex_frac(f)}", tex_frac(f), f"-{plain_frac(f)}", plain_frac(f)

    def double_negative(r):
        n = r.randint(1, 999)
        return f"-{n}", f"-(-{n})", f"-{n}", f"-(-{n})"

    def difference_reversed(r):
        a, b = r.sample(range(1, 30), 2)
        return f"{a}-{b}", f"{b}-{a}", f"{a}-{b}", f"{b}-{a}"

    equal = {
        "-\\frac{a}{b} vs \\frac{-a}{b}": minus_in_numerator,
        "-\\frac{a}{b} vs \\frac{a}{-b}": minus_in_denominator,
        "-fraction vs -decimal": decimal,
        "unicode minus": unicode_minus,
        "-(n)": parenthesized,
    }
    unequal = {
        "sign dropped": sign_dropped,
        "fraction sign dropped": fraction_sign_dropped,
        "double negative": double_negative,
        "a-b vs b-a": difference_reversed,
    }
    return equal, unequal


FAMILIES = {
    "integers": integers,
    "fractions": fractions,
    "decimals": decimals,
    "radicals": radicals,
    "pi": pis,
    "intervals": intervals,
    "sets": sets,
    "tuples": tuples,
    "percentages": percentages,
    "scientific": scientific,
    "negatives": negatives,
}


def generate(count: int, seed: int) -> list[Pair]:
    """Families in turn, equal and unequal in turn within each family; the variant drawn at random. No pair twice."""
    rng = random.Random(seed)
    variants = {name: make() for name, make in FAMILIES.items()}
    names, pairs, seen = list(FAMILIES), [], set()
    for i in range(count):
        family = names[i % len(names)]
        label = (i // len(names)) % 2 == 0
        table = variants[family][0 if label else 1]
        for _ in range(100):
            variant = rng.choice(sorted(table))
            gold, answer, gold_plain, answer_plain = table[variant](rng)
            if (gold, answer) not in seen:
                break
        seen.add((gold, answer))
        pairs.append(Pair(family, variant, gold, answer, gold_plain, answer_plain, label))
    return pairs


# ---- the three comparisons ----


class PairTimeout(Exception):
    pass


def with_alarm(seconds: int, fn: Callable[[], Any]) -> Any:
    def handler(signum, frame):
        raise PairTimeout(f"over {seconds} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def sympy_value(text: str) -> Any:
    return parse_expr(text, transformations=TRANSFORMS)


def sympy_equal(a: Any, b: Any) -> bool:
    if isinstance(a, sympy.Set) or isinstance(b, sympy.Set):
        if not (isinstance(a, sympy.Set) and isinstance(b, sympy.Set)):
            return False
        return a == b or a.symmetric_difference(b) == sympy.S.EmptySet
    if isinstance(a, sympy.Tuple) or isinstance(b, sympy.Tuple):
        if not (isinstance(a, sympy.Tuple) and isinstance(b, sympy.Tuple)) or len(a) != len(b):
            return False
        return all(sympy.simplify(x - y) == 0 for x, y in zip(a, b, strict=True))
    return sympy.simplify(a - b) == 0


class SwallowedCounter(logging.Handler):
    """Counts what math-verify logs and swallows (timeouts as warnings, comparison and parsing errors as debug)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info or "Error" in record.getMessage():
            self.records.append(record.getMessage()[:120])


def short(value: Any, width: int = 48) -> str:
    text = " ".join((repr(value) if not isinstance(value, str) else value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def exact_on_latex(text: str) -> Any:
    """math-verify's own LaTeX parser (latex2sympy2_extended), then unevaluated parts evaluated (percentages) and
    every float made the rational it writes, so that the comparison after it is exact."""
    from latex2sympy2_extended import latex2sympy

    value = latex2sympy(text)
    value = value.doit() if isinstance(value, sympy.Basic) else value
    return sympy.nsimplify(value, rational=True) if isinstance(value, sympy.Basic) else value


def timed(row: dict[str, Any], key: str, compare: Callable[[], tuple[bool, list[str]]]) -> None:
    started = time.perf_counter()
    try:
        row[key], row[f"{key}_parsed"] = with_alarm(10, compare)
    except Exception as exc:  # noqa: BLE001 -- one pair's failure is a figure, not the end of the run
        row[key], row[f"{key}_parsed"] = (
            "error",
            [f"{type(exc).__name__}: {short(str(exc).splitlines()[0] if str(exc) else '')}", ""],
        )
    row[f"{key}_seconds"] = time.perf_counter() - started


def run_pair(pair: Pair, wrap: str, counter: SwallowedCounter, mv: tuple[Any, Any]) -> dict[str, Any]:
    parse, verify = mv
    wrapped = (lambda s: f"${s}$") if wrap == "dollar" else (lambda s: f"\\boxed{{{s}}}")
    row: dict[str, Any] = asdict(pair)
    counter.records.clear()
    started = time.perf_counter()
    try:  # no alarm of ours here: math-verify sets its own SIGALRM timeouts (5 s to parse, 5 s to compare)
        gold = parse(wrapped(pair.gold))
        answer = parse(wrapped(pair.answer))
        row["mv"] = bool(verify(gold, answer))
        row["mv_parsed"] = [short(gold[0] if gold else None), short(answer[0] if answer else None)]
    except Exception as exc:  # noqa: BLE001
        row["mv"], row["mv_parsed"] = (
            "error",
            [f"{type(exc).__name__}: {short(str(exc).splitlines()[0] if str(exc) else '')}", ""],
        )
    row["mv_seconds"] = time.perf_counter() - started
    row["mv_swallowed"] = list(counter.records)

    def on_plain():
        a, b = sympy_value(pair.gold_plain), sympy_value(pair.answer_plain)
        return sympy_equal(a, b), [short(a), short(b)]

    def on_latex():
        a, b = exact_on_latex(pair.gold), exact_on_latex(pair.answer)
        return sympy_equal(a, b), [short(a), short(b)]

    timed(row, "sympy", on_plain)
    timed(row, "l2s", on_latex)
    return row


METHODS = {"mv": "math-verify", "sympy": "sympy (plain)", "l2s": "latex2sympy + exact"}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pairs": len(rows),
        "equal": sum(r["label"] for r in rows),
        "unequal": sum(not r["label"] for r in rows),
        "mv_vs_sympy": sum(1 for r in rows if r["mv"] == r["sympy"]),
        "mv_swallowed": sum(1 for r in rows if r["mv_swallowed"]),
    }
    for m in METHODS:
        out |= {
            f"{m}_vs_label": sum(1 for r in rows if r[m] == r["label"]),
            f"{m}_false_equal": sum(1 for r in rows if r[m] is True and not r["label"]),
            f"{m}_false_unequal": sum(1 for r in rows if r[m] is False and r["label"]),
            f"{m}_errors": sum(1 for r in rows if r[m] == "error"),
            f"{m}_median_ms": round(1000 * statistics.median(r[f"{m}_seconds"] for r in rows), 2),
            f"{m}_max_ms": round(1000 * max(r[f"{m}_seconds"] for r in rows), 1),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--wrap", choices=["dollar", "boxed"], default="dollar", help="how answers reach parse()")
    parser.add_argument("--json", action="store_true", help="print the figures and every disagreement as JSON")
    args = parser.parse_args()

    counter = SwallowedCounter()
    mv_logger = logging.getLogger("math_verify")
    mv_logger.setLevel(logging.DEBUG)
    mv_logger.propagate = False
    mv_logger.addHandler(counter)
    started = time.perf_counter()
    from math_verify import parse, verify  # imported here: its import time is reported apart

    import_seconds = time.perf_counter() - started
    # No method's first call (grammar load, sympy caches) counts in the medians: one warm-up pair, not kept.
    warm = Pair("warm-up", "", "\\frac{1}{2}", "0.5", "1/2", "0.5", True)
    run_pair(warm, args.wrap, counter, (parse, verify))

    pairs = generate(args.pairs, args.seed)
    started = time.perf_counter()
    rows = [run_pair(p, args.wrap, counter, (parse, verify)) for p in pairs]
    total_seconds = time.perf_counter() - started
    load = os.getloadavg()[0]
    families = {name: summarize([r for r in rows if r["family"] == name]) for name in FAMILIES}
    overall = summarize(rows)
    order = {name: i for i, name in enumerate(FAMILIES)}
    disagreements = sorted(
        (r for r in rows if len({r["mv"], r["sympy"], r["l2s"], r["label"]}) > 1),
        key=lambda r: (order[r["family"]], r["variant"], r["gold"]),
    )
    key = lambda r: (r["family"], r["variant"], r["label"])
    variants = Counter(key(r) for r in rows)
    wrong = {m: Counter(key(r) for r in rows if r[m] != r["label"]) for m in METHODS}
    result = {
        "seed": args.seed, "wrap": args.wrap, "import_seconds": round(import_seconds, 2),
        "total_seconds": round(total_seconds, 1), "load_average": load, "overall": overall, "families": families,
        "variants": [
            {"family": f, "variant": v, "label": lab, "pairs": n, **{f"{m}_wrong": wrong[m][f, v, lab] for m in METHODS}}
            for (f, v, lab), n in sorted(variants.items())
        ],
        "disagreements": disagreements,
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return

    def pct(k, s):
        return f"{s[k]}/{s['pairs']} ({s[k] / s['pairs']:.1%})"

    print(f"{overall['pairs']} pairs (seed {args.seed}, {len(variants)} variants), answers wrapped as {args.wrap}")
    print(
        f"math-verify import {import_seconds:.1f} s; all pairs, all three methods {total_seconds:.1f} s (1 process, load average {load:.1f})"
    )
    print()
    print("| family | pairs | equal / unequal | math-verify = label | sympy (plain) = label | math-verify = sympy | "
          "latex2sympy + exact = label | median ms: mv / sympy / l2s |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, s in [*families.items(), ("all", overall)]:
        print(
            f"| {name} | {s['pairs']} | {s['equal']} / {s['unequal']} | {pct('mv_vs_label', s)} | "
            f"{pct('sympy_vs_label', s)} | {pct('mv_vs_sympy', s)} | {pct('l2s_vs_label', s)} | "
            f"{s['mv_median_ms']} / {s['sympy_median_ms']} / {s['l2s_median_ms']} |"
        )
    print()
    for m, name in METHODS.items():
        print(
            f"{name}: {overall[f'{m}_false_equal']} unequal pairs called equal, {overall[f'{m}_false_unequal']} "
            f"equal pairs called unequal, {overall[f'{m}_errors']} errors; median {overall[f'{m}_median_ms']} ms, "
            f"slowest {overall[f'{m}_max_ms']} ms per pair"
        )
    print(f"math-verify pairs with an error or timeout it logged and swallowed: {overall['mv_swallowed']}")
    print()
    print("Variants where a method differs from the label at least once:")
    print()
    print("| family | variant | label | pairs | " + " | ".join(f"{n} wrong" for n in METHODS.values()) + " |")
    print("|---|---|---|---:|" + "---:|" * len(METHODS))
    for v in result["variants"]:
        if any(v[f"{m}_wrong"] for m in METHODS):
            counts = " | ".join(str(v[f"{m}_wrong"]) for m in METHODS)
            print(f"| {v['family']} | {v['variant']} | {v['label']} | {v['pairs']} | {counts} |")
    print()
    print(f"{len(disagreements)} pairs where the label and the three methods do not all agree:")
    print()
    print(
        "| family | variant | gold | answer | label | math-verify | sympy (plain) | latex2sympy + exact | "
        "math-verify parsed (gold; answer) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in disagreements:
        cells = [r["family"], r["variant"], f"`{r['gold']}`", f"`{r['answer']}`", r["label"], r["mv"], r["sympy"]]
        l2s = r["l2s"] if r["l2s"] != "error" else f"error: {r['l2s_parsed'][0]}"
        parsed = f"`{r['mv_parsed'][0]}`; `{r['mv_parsed'][1]}`"
        print("| " + " | ".join(str(c) for c in cells) + f" | {l2s} | {parsed} |")
    swallowed = Counter(m for r in rows for m in r["mv_swallowed"])
    if swallowed:
        print()
        print("math-verify logged and swallowed:", dict(swallowed.most_common(10)))


if __name__ == "__main__":
    main()
