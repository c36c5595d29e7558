"""Every script in tools/ runs its CPU self-check (``--host imitation``) end to end.

The tools check lib_seg against real host trees, which CI does not have, so nothing ran them and a
refactor could break them unseen (issue 14).  In ``--host imitation`` they take the host's model
classes, patcher and sampling module from tests/support instead, and everything else — their
reference implementation, comparison, leftover-hook checks and report — runs as on a real host.  Each
runs here in a subprocess; every check it reports must pass and every check it promises must be there.
"""

from __future__ import annotations

import itertools
import re

from tests.support.scripts import run_module

CASES = ("Flux", "Flux+Kontext", "MMDiT", "MMDiT+attn2")  # dit_backend_smoke.imitation_cases
SPECS = {"Flux": ("all", "d1", "s0"), "MMDiT": ("all", "j0", "j1")}


def _report(stdout: str) -> list[str]:
    """The PASS lines of a PASS/FAIL report that ended in OK with no FAIL."""
    lines = stdout.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], stdout
    assert lines[-1] == "OK", stdout
    return [line[len("PASS ") :] for line in lines if line.startswith("PASS ")]


def test_dit_backend_smoke_imitation() -> None:
    run = run_module("tools.dit_backend_smoke", "--host", "imitation").check()
    passed = _report(run.stdout)
    for case in CASES:
        label = f"imitation {case} 9x13"
        specs = SPECS[case.split("+")[0]]
        for spec, sigma in itertools.product(specs, ("0.5", "1.5", "inf")):
            line = next((p for p in passed if p.startswith(f"{label} {spec:>3} sigma={sigma}: rel err")), None)
            assert line is not None, f"no blur check for {label} {spec} sigma={sigma}:\n{run.stdout}"
            effect = float(re.search(r"effect (\S+)", line).group(1))
            assert effect > 0, line  # the blur moved the output (the tool bounds it below by its error bound)
        for check in ("no hooks before", "no block skipped []", "no hooks left", "plain output bit-identical after"):
            assert f"{label}: {check}" in passed, f"{label}: {check} missing"


def test_dit_adapter_smoke_imitation() -> None:
    run = run_module("tools.dit_adapter_smoke", "--host", "imitation").check()
    assert "lib_seg host kind forge" in run.stdout.splitlines()[0]
    passed = _report(run.stdout)
    settings = {"Flux": (("d1,s0", "1.5"), ("all", "inf")), "MMDiT": (("j0", "1.5"), ("all", "inf"))}
    for case in ("Flux", "MMDiT", "MMDiT+attn2"):  # Kontext needs ref_latents conds, which no host batches
        label = f"imitation {case} 9x13"
        for (spec, blur), cfg in itertools.product(settings[case.split("+")[0]], ("1", "4")):
            main = 2 if cfg == "1" else 4  # two images; CFG 1 skips the uncond rows
            for mode, calls in (("batched", [main + 2]), ("separate", [main, 2])):
                where = f"{label} {spec} sigma={blur} cfg={cfg} {mode}"
                assert any(p.startswith(f"{where}: rel err") for p in passed), f"{where}: no comparison"
                assert f"{where}: transformer calls {calls} == {calls}" in passed, where
                assert f"{where}: no hooks left" in passed, where
        for check in (
            "SEG disabled: nothing installed",
            "SEG scale 0: nothing installed",
            "layers j7: sampling raised",
        ):
            assert any(p.startswith(f"{label} {check}") for p in passed), f"{label} {check} missing"
        assert f"{label}: plain patcher's model_options untouched" in passed


def test_forge_backend_smoke_imitation() -> None:
    run = run_module("tools.forge_backend_smoke", "--host", "imitation").check()
    lines = run.stdout.splitlines()
    assert lines[0] == "host_kind: forge" and lines[-1] == "OK", run.stdout
    steps = re.findall(
        r"^cfg (\S+), middle, inf, batch_rows=(\w+): UNet call rows (\[.*?\]).*max err (\S+),", run.stdout, re.M
    )
    # two images: CFG 7 batches cond+uncond (4 rows), CFG 1 only cond (2); SEG adds 2 rows inside or a call of 2
    expected = [("7.0", "True", "[6]"), ("7.0", "False", "[4, 2]"), ("1.0", "True", "[4]"), ("1.0", "False", "[2, 2]")]
    assert [step[:3] for step in steps] == expected, run.stdout
    assert all(float(step[3]) < 1e-5 for step in steps)  # the tool asserts it too
    assert re.search(r"^cfg 7, d1 on a \(13, 9\) grid, sigma 2: max err", run.stdout, re.M), run.stdout
    assert re.search(r"^bad layers raised: SEG layers: 'd2'", run.stdout, re.M), run.stdout
