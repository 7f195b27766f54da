"""A restricted row-selection grammar for ``--controls`` / ``--positive``.

pandas' ``DataFrame.query`` evaluates ``@name`` references and arbitrary expressions, so a query
string could run code. Here a query is parsed with :mod:`ast` and evaluated by this module alone;
only these forms are accepted:

- comparisons of a column with a literal or another column: ``==  !=  <  <=  >  >=``
  (chains such as ``1 <= Metadata_Dose < 5`` too);
- membership: ``Metadata_Compound in ["DMSO", "none"]`` and ``not in``;
- ``and`` / ``or`` / ``not`` (and their pandas spellings ``&`` / ``|`` / ``~``), with parentheses.

Literals are strings, numbers, ``True``/``False`` and lists or tuples of them. Column names that are
not Python identifiers may be written in backticks, as in pandas.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..core.errors import MicrosnoopError
from ..io.writers import is_feature_column

_CMP = {ast.Eq: "__eq__", ast.NotEq: "__ne__", ast.Lt: "__lt__", ast.LtE: "__le__", ast.Gt: "__gt__",
        ast.GtE: "__ge__"}
_BACKTICK = re.compile(r"`([^`]*)`")


class _Query:
    def __init__(self, text: str, option: str):
        self.text, self.option = text, option
        self.names: dict[str, str] = {}
        self.tree = self._parse(text)

    def fail(self, why: str) -> MicrosnoopError:
        return MicrosnoopError(f"{self.option} {self.text!r}: {why}; allowed: column comparisons (==, !=, <, <=, >, >=), "
                               f"'in [...]', and/or/not")

    def _parse(self, text: str) -> ast.Expression:
        if "@" in _BACKTICK.sub("", _strip_strings(text)):
            raise self.fail("'@' references are not allowed")

        def sub(m: re.Match) -> str:  # `odd column name` -> a placeholder identifier
            key = f"__col{len(self.names)}__"
            self.names[key] = m.group(1)
            return key

        try:
            return ast.parse(_pandas_precedence(_BACKTICK.sub(sub, text).strip()), mode="eval")
        except SyntaxError as exc:
            raise self.fail(f"not a valid expression ({exc.msg})") from None

    def column(self, node: ast.Name, df: pd.DataFrame) -> pd.Series:
        name = self.names.get(node.id, node.id)
        if name not in df.columns:
            meta = [c for c in df.columns if not is_feature_column(c)]
            raise MicrosnoopError(f"{self.option} {self.text!r}: no column '{name}'; columns are {', '.join(map(str, meta))}")
        return df[name]

    def literal(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant) \
                and isinstance(node.operand.value, (int, float)) and not isinstance(node.operand.value, bool):
            return -node.operand.value
        raise self.fail(f"'{ast.unparse(node)}' is not a column or a literal")

    def operand(self, node: ast.AST, df: pd.DataFrame) -> Any:
        return self.column(node, df) if isinstance(node, ast.Name) else self.literal(node)

    def evaluate(self, node: ast.AST, df: pd.DataFrame) -> np.ndarray:
        if isinstance(node, ast.Expression):
            return self.evaluate(node.body, df)
        if isinstance(node, ast.BoolOp):
            parts = [self.evaluate(v, df) for v in node.values]
            return np.logical_and.reduce(parts) if isinstance(node.op, ast.And) else np.logical_or.reduce(parts)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
            a, b = self.evaluate(node.left, df), self.evaluate(node.right, df)
            return a & b if isinstance(node.op, ast.BitAnd) else a | b
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)):
            return ~self.evaluate(node.operand, df)
        if isinstance(node, ast.Compare):
            return self.compare(node, df)
        if isinstance(node, ast.Name):  # a boolean column on its own
            col = self.column(node, df)
            if col.dtype != bool:
                raise self.fail(f"column '{self.names.get(node.id, node.id)}' is not true/false; compare it with a value")
            return col.to_numpy()
        raise self.fail(f"'{ast.unparse(node)}' is not allowed")

    def compare(self, node: ast.Compare, df: pd.DataFrame) -> np.ndarray:
        result = np.ones(len(df), dtype=bool)
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                if not isinstance(left, ast.Name) or not isinstance(right, (ast.List, ast.Tuple, ast.Set)):
                    raise self.fail("'in' needs a column on the left and a list [...] on the right")
                values = [self.literal(v) for v in right.elts]
                hit = self.column(left, df).isin(values).to_numpy()
                result &= ~hit if isinstance(op, ast.NotIn) else hit
            elif type(op) in _CMP:
                a, b = self.operand(left, df), self.operand(right, df)
                if not isinstance(a, pd.Series) and not isinstance(b, pd.Series):
                    raise self.fail(f"'{ast.unparse(node)}' compares no column")
                if not isinstance(a, pd.Series):  # literal OP column -> column (reflected) literal
                    a, b = b, a
                    op = {ast.Lt: ast.Gt(), ast.Gt: ast.Lt(), ast.LtE: ast.GtE(), ast.GtE: ast.LtE()}.get(type(op), op)
                try:
                    hit = getattr(a, _CMP[type(op)])(b)
                except TypeError as exc:
                    raise self.fail(f"cannot compare in '{ast.unparse(node)}' ({exc})") from None
                result &= np.asarray(hit.fillna(False) if hasattr(hit, "fillna") else hit, dtype=bool)
            else:
                raise self.fail(f"operator '{type(op).__name__}' is not allowed")
            left = right
        return result


def _pandas_precedence(text: str) -> str:
    """In pandas queries ``&``, ``|`` and ``~`` bind like ``and``, ``or`` and ``not`` (so ``a == 1 | b > 2``
    means ``(a == 1) or (b > 2)``); Python binds them tighter than comparisons. Rewrite the tokens."""
    swap = {"&": "and", "|": "or", "~": "not"}
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return text  # ast.parse reports the problem
    out = [(tokenize.NAME, swap[t.string]) if t.type == tokenize.OP and t.string in swap else (t.type, t.string)
           for t in toks]
    return tokenize.untokenize(out)


def _strip_strings(text: str) -> str:
    """The query without its quoted string literals (an '@' inside a string is just a character)."""
    return re.sub(r"'(?:\\.|[^'\\])*'|\"(?:\\.|[^\"\\])*\"", "''", text)


def check_query(query: str, columns: Sequence[str] | None = None, option: str = "--controls") -> None:
    """Parse ``query`` (and check its column names, when ``columns`` is given) without evaluating it,
    so a bad option fails before any expensive work."""
    q = _Query(query, option)
    if columns is not None:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
        q.evaluate(q.tree, empty)


def select(df: pd.DataFrame, query: str, option: str = "--controls") -> np.ndarray:
    """Boolean mask of the rows of ``df`` matching ``query`` (see the module docstring for the grammar)."""
    q = _Query(query, option)
    mask = np.asarray(q.evaluate(q.tree, df), dtype=bool)
    if mask.shape != (len(df),):
        raise q.fail("it does not select rows")
    return mask
