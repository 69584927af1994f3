"""A small mixed-integer program builder on HiGHS (``highspy``, imported lazily).

Variables are added in named blocks (numpy index arrays come back), constraints as
sparse rows; ``solve`` returns the values, the objective, the dual bound and whether the
time limit cut the search short, so callers can report a gap instead of hiding it.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

INF = math.inf


@dataclass(frozen=True)
class MilpResult:
    ok: bool  # a feasible (possibly not optimal) solution is available
    values: np.ndarray  # column values (empty when not ok)
    objective: float  # objective of that solution (inf when not ok)
    bound: float  # best proven bound on the objective (minimisation: a lower bound)
    status: str  # HiGHS model status, e.g. "Optimal", "Time limit reached", "Infeasible"
    time_limited: bool  # the solve stopped on its time limit

    @property
    def gap(self) -> float:
        """Relative optimality gap (0 when proven optimal)."""
        if not self.ok:
            return INF
        if self.objective == self.bound:
            return 0.0
        return abs(self.objective - self.bound) / max(abs(self.objective), 1e-9)


_banner_shown = False


def _new_highs(highspy: Any) -> Any:
    """A Highs instance; the first one of a process prints a banner on fd 1 before any
    option can silence it, so that one is created with fd 1 pointed at /dev/null."""
    global _banner_shown
    if _banner_shown:
        return highspy.Highs()
    _banner_shown = True
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class Milp:
    """Minimisation problem built column block by column block."""

    def __init__(self) -> None:
        self._lower: list[np.ndarray] = []
        self._upper: list[np.ndarray] = []
        self._cost: list[np.ndarray] = []
        self._integer: list[np.ndarray] = []
        self.num_cols = 0
        self._row_lower: list[float] = []
        self._row_upper: list[float] = []
        self._row_index: list[np.ndarray] = []
        self._row_value: list[np.ndarray] = []

    def add_vars(
        self, shape: tuple[int, ...], lower: float | np.ndarray = 0.0, upper: float | np.ndarray = INF,
        cost: float | np.ndarray = 0.0, integer: bool = False,
    ) -> np.ndarray:
        """Add a block of variables; return their column indices in ``shape``."""
        n = int(np.prod(shape)) if shape else 1
        self._lower.append(np.broadcast_to(np.asarray(lower, dtype=float), shape).ravel().copy())
        self._upper.append(np.broadcast_to(np.asarray(upper, dtype=float), shape).ravel().copy())
        self._cost.append(np.broadcast_to(np.asarray(cost, dtype=float), shape).ravel().copy())
        self._integer.append(np.full(n, integer, dtype=bool))
        idx = np.arange(self.num_cols, self.num_cols + n).reshape(shape)
        self.num_cols += n
        return idx

    def add_row(self, index: np.ndarray, value: np.ndarray | float, lower: float = -INF, upper: float = INF) -> None:
        index = np.asarray(index, dtype=np.int64).ravel()
        value_arr = np.broadcast_to(np.asarray(value, dtype=float), index.shape).ravel()
        keep = value_arr != 0.0
        self._row_index.append(index[keep])
        self._row_value.append(value_arr[keep])
        self._row_lower.append(lower)
        self._row_upper.append(upper)

    def solve(self, time_limit_s: float, rel_gap: float = 1e-4, start: np.ndarray | None = None) -> MilpResult:
        import highspy  # optional heavy dependency, imported only when an ILP is solved

        h = _new_highs(highspy)
        h.setOptionValue("output_flag", False)
        h.setOptionValue("time_limit", max(float(time_limit_s), 0.05))
        h.setOptionValue("mip_rel_gap", float(rel_gap))
        h.setOptionValue("threads", 1)
        lower = np.concatenate(self._lower)
        upper = np.concatenate(self._upper)
        h.addVars(self.num_cols, lower, upper)
        h.changeColsCost(self.num_cols, np.arange(self.num_cols, dtype=np.int32), np.concatenate(self._cost))
        integer = np.concatenate(self._integer)
        if integer.any():
            cols = np.flatnonzero(integer).astype(np.int32)
            h.changeColsIntegrality(len(cols), cols, np.full(len(cols), highspy.HighsVarType.kInteger))
        if self._row_lower:
            lengths = np.array([len(i) for i in self._row_index], dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
            h.addRows(
                len(self._row_lower), np.array(self._row_lower), np.array(self._row_upper), int(lengths.sum()),
                starts, np.concatenate(self._row_index).astype(np.int32), np.concatenate(self._row_value),
            )
        if start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = list(np.asarray(start, dtype=float))
            sol.value_valid = True
            h.setSolution(sol)
        h.run()
        status = h.modelStatusToString(h.getModelStatus())
        info = h.getInfo()
        time_limited = h.getModelStatus() == highspy.HighsModelStatus.kTimeLimit
        ok = info.primal_solution_status == highspy.SolutionStatus.kSolutionStatusFeasible
        if not ok:
            return MilpResult(False, np.empty(0), INF, -INF, status, time_limited)
        values = np.array(h.getSolution().col_value, dtype=np.float64)
        objective = float(info.objective_function_value)
        bound = float(info.mip_dual_bound) if integer.any() else objective
        return MilpResult(True, values, objective, min(bound, objective), status, time_limited)
