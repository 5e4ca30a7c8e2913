"""Countdown (TinyZero's task): reach a target with the given numbers and + - * /, each number at
most once, e.g. `reach 24 with 3 5 7 2` → `7*3+5-2`, or any other expression over a sub-multiset of
the numbers whose exact value is the target.

Problems are built so a solution exists: the target is what combining every drawn number in a
random order gives (intermediate results positive integers), kept when it lies in 1..max_target.
The `answer` column holds the problem, `3 5 7 2 -> 24`, since many expressions are right; the
verifier parses the tagged expression (a small recursive-descent parser, never Python's eval),
evaluates it exactly with fractions and checks the numbers it uses against the given ones.

The worked chain is a depth-first search over "combine two of the numbers left". Each first
combination the search tries is one line; one that leads nowhere ends in `no`, and the one that
works is followed down to the target. With `chain: checked` (the default) a line that leaves two
numbers lists, after a colon, what their last combination gives (`+ - * /` in that order, up to the
target), so every `no` and every step to the target is checked on the page; deeper dead ends (four
numbers) and `chain: silent` search their subtree silently:

    <think>
    5 9 2 -> 19
    9+5=14 [2 14]: 16 12 28 7 no
    9-5=4 [2 4]: 6 2 8 2 no
    9*5=45 [2 45]: 47 43 90 no
    5+2=7 [9 7]: 16 2 63 no
    5-2=3 [9 3]: 12 6 27 3 no
    5*2=10 [9 10]: 19
    10+9=19
    </think>

    <answer>5*2+9</answer>

A model writing the silent chain must decide a line's `no` before writing it, i.e. solve the rest
in its head; the demo's 0.74M model did not, and wrote a last line that claimed the target
(`11+5=19`) instead (docs/tasks.md).

With `answer_noise`, that share of train rows tags a slipped answer under a right chain (one operator
changed so the expression misses the target; a bare-number answer off by 1..3), as the integer
tasks' noise does; held-out rows never.
"""

from __future__ import annotations

import re
from fractions import Fraction

from r1jax.config import TaskConfig
from r1jax.data.tasks import Worked, distinct_problems, draw_in_split, extract_answer, noise_stream

_SPEC = re.compile(r"\s*((?:\d+\s+)*\d+)\s*->\s*(\d+)\s*")
_TOKEN = re.compile(r"\s*(\d+|[-+*/()])")
_MAX_EXPRESSION = 200  # characters; longer answers are rejected before parsing

# An item of the search: (value, expression text, precedence of its top operator; 3 for a number).
_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _combine(a, b, op):
    """The item `a op b`, or None when the result is not a positive integer (the search's rule)."""
    (x, ex, px), (y, ey, py) = a, b
    value = {"+": x + y, "-": x - y, "*": x * y, "/": x // y if y and x % y == 0 else 0}[op]
    if value <= 0:
        return None
    p = _PREC[op]
    # Parentheses only where precedence needs them: a right operand of - or / binds as a whole.
    left = f"({ex})" if px < p else ex
    right = f"({ey})" if py < p or (py == p and op in "-/") else ey
    return value, f"{left}{op}{right}", p


def _moves(items):
    """Every (i, j, op, result) combining two items, larger first, in a fixed order."""
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            a, b = (items[i], items[j]) if items[i][0] >= items[j][0] else (items[j], items[i])
            for op in "+-*/":
                out = _combine(a, b, op)
                if out is not None:
                    yield i, j, op, a, b, out


def _solve(items, target):
    """A list of (a, op, b, result, rest) steps reaching the target, or None (depth-first)."""
    for item in items:
        if item[0] == target:
            return []
    for i, j, op, a, b, out in _moves(items):
        rest = [it for k, it in enumerate(items) if k not in (i, j)] + [out]
        path = _solve(rest, target)
        if path is not None:
            return [(a, op, b, out, rest)] + path
    return None


def _outcomes(rest, target) -> str:
    """`: v1 v2 ...`, what the last combination of two items left gives, in the search's order and up
    to the target; empty when more than two are left or the target is already among them."""
    if len(rest) != 2 or any(it[0] == target for it in rest):
        return ""
    values = []
    for *_, out in _moves(rest):
        values.append(str(out[0]))
        if out[0] == target:
            break
    return ": " + " ".join(values)


def _line(a, op, b, out, rest, target, checked) -> str:
    left = " ".join(str(it[0]) for it in rest)
    line = f"{a[0]}{op}{b[0]}={out[0]}" + (f" [{left}]" if len(rest) > 1 else "")
    return line + (_outcomes(rest, target) if checked else "")


def worked_chain(numbers: list[int], target: int, chain: str = "checked") -> tuple[list[str], str] | None:
    """(chain lines, answer expression) of the search, or None when no expression reaches the target.
    chain: "checked" lists the last combination's values on each line that leaves two numbers,
    "silent" does not (module docstring)."""
    if chain not in ("checked", "silent"):
        raise ValueError(f"countdown chain must be 'checked' or 'silent', got {chain!r}")
    checked = chain == "checked"
    items = [(n, str(n), 3) for n in numbers]
    lines = [f"{' '.join(map(str, numbers))} -> {target}"]
    for item in items:
        if item[0] == target:
            return lines, item[1]
    for i, j, op, a, b, out in _moves(items):
        rest = [it for k, it in enumerate(items) if k not in (i, j)] + [out]
        path = _solve(rest, target)
        if path is None:
            lines.append(_line(a, op, b, out, rest, target, checked) + " no")
            continue
        steps = [(a, op, b, out, rest)] + path
        lines += [_line(*s, target, checked) for s in steps]
        return lines, steps[-1][3][1]
    return None


def _draw(cfg: TaskConfig, rng):
    """(numbers, target) with a solution: the numbers combined in a random order and with random ops."""
    c = cfg.countdown
    while True:
        n = int(rng.integers(c.min_numbers, c.max_numbers + 1))
        numbers = [int(x) for x in rng.integers(1, c.max_number + 1, size=n)]
        pool = list(numbers)
        while len(pool) > 1:
            a, b = (pool.pop(int(rng.integers(len(pool)))) for _ in range(2))
            a, b = max(a, b), min(a, b)
            options = [a + b, a * b] + ([a - b] if a > b else []) + ([a // b] if b > 1 and a % b == 0 else [])
            pool.append(options[int(rng.integers(len(options)))])
        if 1 <= pool[0] <= c.max_target:
            return numbers, pool[0]


def spec(numbers: list[int], target: int) -> str:
    """The `answer` column: the numbers and the target, `3 5 7 2 -> 24`."""
    return f"{' '.join(map(str, numbers))} -> {target}"


def slipped_expression(cfg: TaskConfig, index: int, expression: str, target: int) -> str | None:
    """For a share `answer_noise` of train problems, the chain's expression with one operator slipped
    (`5*2+9` -> `5*2-9`) to one that misses the target, as a hasty writer would tag it, or when the
    answer is a bare number (the target is a given number) that number off by 1..3 like the integer
    tasks' noise; else None."""
    rng = noise_stream(cfg, index)
    if rng is None:
        return None
    if expression.isdigit():
        # Offsets that keep the answer a number the verifier parses (no unary minus).
        offsets = [d for d in (-3, -2, -1, 1, 2, 3) if int(expression) + d >= 0]
        return str(int(expression) + offsets[int(rng.integers(len(offsets)))])
    swaps = [expression[:i] + op + expression[i + 1:]
             for i, ch in enumerate(expression) if ch in _PREC for op in _PREC if op != ch]
    slips = [text for text in swaps if (result := evaluate_expression(text)) is not None and result[0] != target]
    return slips[int(rng.integers(len(slips)))] if slips else None


def generate(cfg: TaskConfig, split: str, index: int) -> Worked:
    numbers, target = draw_in_split(cfg, split, index, lambda rng: _draw(cfg, rng), lambda d: spec(*d))
    lines, expression = worked_chain(numbers, target, cfg.countdown.chain)
    noisy = slipped_expression(cfg, index, expression, target) if split == "train" else None
    return Worked(id=f"countdown/{split}/{index}", key=spec(numbers, target),
                  question=f"reach {target} with {' '.join(map(str, numbers))}", chain=tuple(lines),
                  answer=noisy or expression, gold=spec(numbers, target))


def problems(cfg: TaskConfig, split: str, n: int) -> list[Worked]:
    return distinct_problems(cfg, split, n, generate, "countdown")


# --------------------------------------------------------------------------- verification


class _Parser:
    """expr := term (('+'|'-') term)*; term := atom (('*'|'/') atom)*; atom := NUMBER | '(' expr ')'.
    Values are Fractions; a division by zero or a token out of place raises ValueError."""

    def __init__(self, text: str):
        self.tokens, pos = [], 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:
                raise ValueError(f"unexpected character at {pos}")
            self.tokens.append(m.group(1))
            pos = m.end()
        self.i, self.numbers = 0, []

    def _peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _take(self):
        tok = self._peek()
        if tok is None:
            raise ValueError("unexpected end")
        self.i += 1
        return tok

    def parse(self) -> Fraction:
        value = self._expr()
        if self._peek() is not None:
            raise ValueError(f"unexpected {self._peek()!r}")
        return value

    def _expr(self):
        value = self._term()
        while self._peek() in ("+", "-"):
            op, rhs = self._take(), self._term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self):
        value = self._atom()
        while self._peek() in ("*", "/"):
            op, rhs = self._take(), self._atom()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def _atom(self):
        tok = self._take()
        if tok == "(":
            value = self._expr()
            if self._take() != ")":
                raise ValueError("unbalanced parenthesis")
            return value
        if not tok.isdigit():
            raise ValueError(f"unexpected {tok!r}")
        self.numbers.append(int(tok))
        return Fraction(int(tok))


def evaluate_expression(text: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, the numbers it uses) of an arithmetic expression, or None when malformed."""
    if len(text) > _MAX_EXPRESSION:
        return None
    try:
        parser = _Parser(text)
        return parser.parse(), parser.numbers
    except ValueError:
        return None


def parse_spec(gold: str) -> tuple[list[int], int]:
    m = _SPEC.fullmatch(str(gold))
    if m is None:
        raise ValueError(f"countdown: the answer column must read like '3 5 7 2 -> 24', got {gold!r}")
    return [int(x) for x in m.group(1).split()], int(m.group(2))


def uses_given(used: list[int], numbers: list[int]) -> bool:
    """Each number used at most as often as it is given."""
    left = list(numbers)
    for x in used:
        if x not in left:
            return False
        left.remove(x)
    return True


def verify(gold: str, completion: str) -> bool:
    """The completion's final answer is an expression over the given numbers (each at most once)
    whose exact value is the target. `gold` is the `answer` column (`3 5 7 2 -> 24`)."""
    numbers, target = parse_spec(gold)
    answer = extract_answer(completion)
    result = None if answer is None else evaluate_expression(answer)
    return result is not None and result[0] == target and uses_given(result[1], numbers)
