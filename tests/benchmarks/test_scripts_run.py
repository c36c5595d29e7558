"""Every script in benchmarks/ runs in its --tiny CPU mode and prints what it promises.

The benchmarks are not tests, but they call the adapters and the host imitations directly, so a
refactor can break them silently (issue 14: ``seg_step.py --sigmas 10`` crashed after
``lib_seg/targets.py`` came in).  Here each script runs in a subprocess as a person runs it, and
its table must have the rows and the checks its docstring describes.  Nothing here asserts on
timings: on the CPU they mean nothing.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest

from tests.support.scripts import markdown_tables, run_module

# Loose on purpose: batched and separate SEG differ by the host's batch-shape rounding noise, a small
# fraction of the SEG effect in float32 (about 1e-4 here); a broken batched path is off by the whole
# effect (1), so a tenth of it separates the two whatever the CPU's summation order.
OF_EFFECT = 0.1


def _number(cell: str) -> float:
    """``1.23×`` / ``4.5e-04`` / ``-`` as a float (``-`` is nan)."""
    return math.nan if cell == "-" else float(cell.rstrip("×"))


def _table(path: Path) -> list[list[str]]:
    tables = markdown_tables(path.read_text())
    assert len(tables) == 1, tables
    return tables[0]


def _seg_step_checks(rows: list[list[str]], expected: set[tuple[str, str, str]]) -> None:
    """seg_step.py's columns: model, size, batch, layers, sigma, CFG ms, 3 ratios, blur share, peaks,
    off bit-identical, prefix error."""
    assert {(r[0], r[3], r[4]) for r in rows} == expected and len(rows) == len(expected)
    for row in rows:
        assert len(row) == 13, row
        assert all(math.isfinite(_number(cell)) and _number(cell) > 0 for cell in row[5:9]), row  # ms, ratios
        if row[4] == "inf":
            assert row[9] == "-", row
        else:  # blur_ms and the noblur mode ran: "alone / in step" percentages
            assert all(math.isfinite(float(share)) for share in row[9].split(" / ")), row
        assert row[11] == "yes", f"SEG off is not bit-identical to no extension: {row}"
        assert _number(row[12]) < OF_EFFECT, f"prefix differs from separate by {row[12]} of the SEG effect"


def test_seg_step_tiny(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    run = run_module("benchmarks.seg_step", "--tiny", "--out", str(out)).check()
    rows = _table(out)
    expected = set(itertools.product(("tiny-sd1", "tiny-sdxl"), ("middle", "all"), ("inf", "10")))
    _seg_step_checks(rows, expected)
    assert all(f"| {' | '.join(row)} |" in run.stdout for row in rows)  # the table is printed too
    assert "CPU (smoke run" in run.stdout


def test_seg_step_finite_sigma_only(tmp_path: Path) -> None:
    """Issue 14's command (``--sigmas 10``: only the finite-sigma path, blur_ms included), on the CPU."""
    out = tmp_path / "table.md"
    run_module("benchmarks.seg_step", "--tiny", "--sigmas", "10", "--layers", "middle", "--out", str(out)).check()
    _seg_step_checks(_table(out), {("tiny-sd1", "middle", "10"), ("tiny-sdxl", "middle", "10")})


def test_forge_step_tiny(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    run = run_module("benchmarks.forge_step", "--tiny", "--out", str(out)).check()
    rows = _table(out)
    expected = set(itertools.product(("tiny-sd1", "tiny-sdxl"), ("middle", "all"), ("inf", "10")))
    assert {(r[0], r[3], r[4]) for r in rows} == expected and len(rows) == len(expected)
    for row in rows:
        assert len(row) == 11, row
        assert all(math.isfinite(_number(cell)) and _number(cell) > 0 for cell in row[5:9]), row
        # batch 2 at CFG 7 with ample memory: cond+uncond in one call, + the SEG call / the rows inside it
        assert row[9] == "2 / 1", f"UNet calls separate / batched: {row[9]}"
        assert _number(row[10]) < OF_EFFECT, row
    assert all(f"| {' | '.join(row)} |" in run.stdout for row in rows)


def test_gpu_equivalence_tiny() -> None:
    run = run_module("benchmarks.gpu_equivalence", "--tiny").check()
    tables = markdown_tables(run.stdout)
    assert len(tables) == 2, run.stdout  # the A1111 adapter, then the Forge-family adapter
    expected = set(itertools.product(("tiny-sdxl", "tiny-sd1"), ("float32", "bfloat16"), ("middle", "all")))
    for rows in tables:
        assert {tuple(r[:3]) for r in rows} == expected and len(rows) == len(expected)
        for row in rows:
            effect, noise, batched, prefix = map(float, row[3:7])
            assert effect > 0 and all(math.isfinite(v) and v >= 0 for v in (noise, batched, prefix)), row
            assert batched < OF_EFFECT * effect and prefix < OF_EFFECT * effect, row
            assert [float(v) for v in row[7].split(" / ")] == pytest.approx([batched / effect, prefix / effect], 0.1)


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the dtype of the GPU run
def test_blur_speed_tiny(dtype: str) -> None:
    run = run_module("benchmarks.blur_speed", "--tiny", "--dtype", dtype).check()
    assert f"dtype={dtype}" in run.stdout
    rows = re.findall(r"^\s*(\d+)x(\d+)\s+(.*)rel\.err (\S+)$", run.stdout, re.MULTILINE)
    assert [(h, w) for h, w, _, _ in rows] == [("8", "8"), ("13", "13")], run.stdout
    for _, _, times, err in rows:
        values = [float(v.rstrip("x")) for v in times.split()]  # ours, axis, grid, 2 convs, dense/ours
        assert len(values) == 6 and all(math.isfinite(v) and v > 0 for v in values), times
        assert float(err) < 1e-2  # the script asserts it too; a NaN would not get here


@pytest.mark.parametrize(
    ("dtype", "host"), [("float32", "forge"), ("bfloat16", "forge"), ("float32", "comfyui")]
)  # bfloat16: the dtype of the GPU run; comfyui: the node's patch_model through ComfyUI's sampling function
def test_dit_step_tiny(tmp_path: Path, dtype: str, host: str) -> None:
    out = tmp_path / "table.md"
    run = run_module("benchmarks.dit_step", "--tiny", "--dtype", dtype, "--host", host, "--out", str(out)).check()
    assert ("ComfyUI node (patch_model)" in run.stdout) == (host == "comfyui")
    rows = _table(out)
    cases = [("flux (tiny)", "1", "1", "inf"), ("flux (tiny)", "2", "4", "10")]
    cases += [("sd35m (tiny)", "1", "4", "inf"), ("sd35m (tiny)", "2", "1", "10"), ("klein4b (tiny)", "1", "1", "inf")]
    # Neo's families: a 4-D latent, a 5-D video latent (3 frames), a 5-D one-frame latent
    cases += [
        ("zimage (tiny)", "1", "1", "inf"),
        ("wan14b (tiny)", "1", "4", "inf"),
        ("qwenimage (tiny)", "2", "1", "10"),
    ]
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == cases
    defaults = {"flux": "d7-9,s7-9", "sd35m": "j7-9", "klein4b": "d2,s10"}  # the models' default blocks
    defaults |= {"zimage": "l15", "wan14b": "b20", "qwenimage": "j30"}  # the middle block of the released counts
    for row in rows:
        assert len(row) == 16 and "NaN" not in row[-1], row
        batch, main = int(row[1]), int(row[1]) * (1 if row[2] == "1" else 2)  # CFG 1: the host skips uncond
        assert row[10] == f"{main} / {main}+{batch} / {main + batch}", f"model rows per call: {row[10]}"
        assert row[3] == defaults[row[0].split()[0]]
        assert 1.0 < _number(row[8]) < 1.0 + batch / main, row  # the ideal: 1 + the share after the prefix
        assert row[12] == "yes", f"SEG off is not bit-identical to no extension: {row}"
        if dtype == "float32":  # bfloat16's rounding noise is of the order of the tiny models' SEG effect
            assert _number(row[15]) < OF_EFFECT, row
        assert all(math.isfinite(_number(cell)) for cell in row[13:16]), row
    assert f"SEG off bit-identical in {len(cases)} of {len(cases)}" in run.stdout
