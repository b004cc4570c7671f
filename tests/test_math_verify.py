"""math-verify 0.9.0, pinned: what the math_answer check relies on, the asymmetry of `verify`, the false positives
reported on its issue tracker (each test says whether 0.9.0 still has it), and why the check runs it in worker
processes. Fast: no model. A failure here after an upgrade means the check's verdicts may change: read the case.

Issues cited: huggingface/Math-Verify #14 (possible error cases), #25 (verify is not symmetric), #37 (\\text{13}),
#47 (a subset of a multi-part answer), #60 (two different linear equations equal), #76 (an answer in Markdown bold).
"""

from __future__ import annotations

import importlib.metadata
import json
import threading
import tomllib

import pytest
from conftest import PROJECT

from polyculture.stages.quality_math_compare import compare_answers, unbold


def _parse(text: str) -> list:
    from math_verify import parse

    return parse(text, parsing_timeout=None)


def _same(gold: str, target: str) -> bool:
    """verify(gold, target) on parsed texts, with math-verify's own (SIGALRM) timeouts off, as the check calls it."""
    from math_verify import verify

    return bool(verify(_parse(gold), _parse(target), timeout_seconds=None))


def test_the_pinned_versions_are_installed_and_declared():
    assert importlib.metadata.version("math-verify") == "0.9.0"
    assert importlib.metadata.version("antlr4-python3-runtime") == "4.13.2"  # the parser runtime latex2sympy needs
    dependencies = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "math-verify[antlr4_13_2]==0.9.0" in [d.split(";")[0].strip() for d in dependencies]


@pytest.mark.parametrize(
    ("gold", "target", "equal"),
    [
        # fractions, decimals, percentages
        ("$\\frac{1}{2}$", "The answer is \\boxed{0.5}.", True),
        ("$0.5$", "$\\frac{1}{2}$", True),
        ("$\\frac{2}{4}$", "$\\frac{1}{2}$", True),
        ("$\\frac{1}{2}$", "$\\frac{1}{3}$", False),
        ("$50\\%$", "$0.5$", True),
        ("$\\frac{1}{3}$", "$0.333$", False),  # three decimals are not a third...
        ("$3$", "\\boxed{0.333}", False),
        # \frac against a/b
        ("$1/2$", "so we get \\boxed{\\frac{1}{2}}", True),
        ("$\\frac{1}{2}$", "1/2", True),
        # radicals
        ("$2\\sqrt{2}$", "\\boxed{\\sqrt{8}}", True),
        ("$\\frac{\\sqrt{2}}{2}$", "\\boxed{\\frac{1}{\\sqrt{2}}}", True),
        ("$\\sqrt{2}$", "$1.41421356$", True),
        ("$\\sqrt{2}$", "$\\sqrt{3}$", False),
        # intervals: bounds and their openness
        ("$(1, 2]$", "\\boxed{(1,2]}", True),
        ("$(1, 2]$", "\\boxed{[1,2]}", False),
        ("$[1,2)$", "$(1,2]$", False),
        # sets, in any order, all members
        ("$\\{1, 2\\}$", "\\boxed{\\{2, 1\\}}", True),
        ("$\\{1, 2\\}$", "\\boxed{\\{1, 2, 3\\}}", False),
        # where the answer is read from: \boxed{} first, else a "final answer" phrase, an equation's right side, ...
        ("$5$", "So the answer is \\boxed{5}.", True),
        ("$42$", "First 40, then \\boxed{41}. Finally \\boxed{42}", True),
        ("$5$", "2 + 3 = 5", True),  # how the embedded model writes most answers: the right side counts
        ("$3$", "12 divided by 4 equals 3.", True),
        ("$3$", "The final answer is: 3", True),
        ("$5$", "The answer is 5 apples.", True),
        ("$x = 5$", "5", True),  # an assignment against its value
        ("$13$", "$\\text{13}$", True),  # #37: False in 0.7.0, fixed in 0.8.0
    ],
)
def test_equivalences_the_check_relies_on(gold, target, equal):
    assert _same(gold, target) is equal


def test_a_hedged_solution_boxing_two_answers_matches_neither():
    """Several \\boxed{} read as the set of them (most of the time): a solution hedging between 4 and 5 is not
    credited with either."""
    assert [str(x) for x in _parse("\\boxed{4} or \\boxed{5}")] == ["{4, 5}", "4,5"]
    assert not _same("$5$", "\\boxed{4} or \\boxed{5}") and not _same("$4$", "\\boxed{4} or \\boxed{5}")
    assert not _same("$5$", "I think \\boxed{4}. No wait, \\boxed{5}")


def test_verify_is_not_symmetric_gold_first():
    """#25, a feature upstream: an inequality or relation as the gold accepts the interval, not the other way round.
    The check always passes the author's answer (or a group's first member) as the gold."""
    assert _same("$\\boxed{m \\geq \\sqrt{2}}$", "the solution is $m \\in [\\sqrt{2}, +\\infty)$")
    assert not _same("the solution is $m \\in [\\sqrt{2}, +\\infty)$", "$\\boxed{m \\geq \\sqrt{2}}$")
    assert _same("$1 < x < 2$", "$(1, 2)$") and not _same("$(1, 2)$", "$1 < x < 2$")


def test_reported_false_positives_that_0_9_0_keeps_apart():
    assert not _same("$\\pm 2021$", "$2021$") and not _same("$2021$", "$\\pm 2021$")  # #14
    assert not _same("$1 - \\frac{1}{e}$", "$1 + \\frac{1}{e}$")  # #14
    assert not _same("$n=2, 3, 4$", "$n=1, 2, 3$") and not _same("$D = (0, 1)$", "$D = (0, 1.5)$")  # #14
    assert not _same("$1331$ and $1728$", "$1728$")  # #47: a part of a two-part answer is not the answer
    # #60 in LaTeX: two different linear equations stay apart
    assert not _same("$3x - y + 13 = 0$", "$3x + 4y + 14 = 0$")


def test_false_positive_still_in_0_9_0_plain_text_equations_read_as_their_right_side():
    """#60: outside LaTeX an equation parses as its right-hand side, so two different lines are both 0 and equal.
    The check wraps the author's answer in $...$ (an equation stays an equation, and never equals a bare 0), but two
    solutions writing different plain-text equations with the same right side fall into one group."""
    assert [str(x) for x in _parse("3x - y + 13 = 0")] == ["0", "0"]
    assert _same("3*x-1*y+13=0", "3x + 4y + 14=0")  # FALSE POSITIVE, documented
    assert not _same("$3x-y+13=0$", "3x + 4y + 14 = 0")  # the author's side in $...$: kept apart


def test_false_positive_still_in_0_9_0_tiny_values_compare_equal():
    """#14: numbers below the comparison's precision are equal, and floats are rounded to 6 decimals: a problem whose
    answer is that small, or needs more places, cannot be verified by this check."""
    assert _same("$\\frac{1}{2^{99}}$", "$\\frac{1}{2^{98}}$")  # FALSE POSITIVE, documented
    assert _same("$\\frac{1}{2004!}$", "$\\frac{1}{2006!}$")  # FALSE POSITIVE, documented
    assert _same("$\\frac{1}{3}$", "$0.333333$")  # six places pass for a third


def test_markdown_bold_answers_and_the_checks_unbolding():
    """#76: `**73**`. 0.9.0 reads 73 (its string form keeps the stars); the check unwraps bold before parsing all the
    same, and leaves a Python power alone (a looser pattern read `2**3 + 2**2` as `23 + 22` = 45)."""
    report = (
        "Left: (x_D + x_G + x_S) + 2(y_DG + y_DS + y_GS) = 437 + 2*234 = 437 + 468 = 905\n\n"
        "Thus, the number of residents who own all four of the things is **73**.\n\n--- \n\nFinal Answer: **73**"
    )
    assert [str(x) for x in _parse(report)] == ["73", "73**"] and _same("$73$", report)
    assert [str(x) for x in _parse(unbold(report))] == ["73", "73"]
    assert unbold("is **x = 3**.") == "is x = 3." and unbold("(**5**)") == "(5)"
    for power in ("2**3 + 2**2", "2 ** 3 ** 2", "a**b**c", "x**2 + y**2"):
        assert unbold(power) == power

    def compared(answer: str, solution: str) -> dict:
        return json.loads(compare_answers({"answer": answer, "solutions": [solution] * 3, "solves": 3})[1])

    assert compared("12", "So the answer is 2**3 + 2**2")["author_is_majority"]
    assert not compared("45", "So the answer is 2**3 + 2**2")["author_is_majority"]
    assert compared("73", report)["solve_rate"] == 1.0


def test_its_own_timeouts_refuse_to_run_outside_the_main_thread():
    """Why the check parses in worker processes with parsing_timeout=None / timeout_seconds=None: with its default
    timeouts (SIGALRM), parse and verify raise in any thread but the main one."""
    from math_verify import parse, verify

    raised: dict[str, str] = {}

    def run() -> None:
        for name, call in (("parse", lambda: parse("$\\frac{1}{2}$")), ("verify", lambda: verify(_parse("$1$"), _parse("$1$")))):
            try:
                call()
            except ValueError as exc:
                raised[name] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert set(raised) == {"parse", "verify"} and all("threaded environment" in m for m in raised.values())
    assert _parse("$\\frac{1}{2}$")[1] == "\\frac{1}{2}"  # and with them off, any thread will do
