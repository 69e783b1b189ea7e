"""fastrnn's benchmark suite: the timing library (measure), the grids (configs), results files, tables and the
regression comparison (report), charts (plot) and the `fastrnn-bench` command (cli). See DESIGN.md, "Speed".
"""

from fastrnn.bench.configs import PRESETS, Case, Settings, grid
from fastrnn.bench.measure import BenchError, measure_case
from fastrnn.bench.report import compare, load, save

__all__ = ["PRESETS", "Case", "Settings", "grid", "BenchError", "measure_case", "compare", "load", "save"]
