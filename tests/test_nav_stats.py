"""Evaluation statistics: Wilson and bootstrap intervals, McNemar's exact test, `streamvln-nav-eval compare`."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from streamvln.nav_eval import compare_cmd, summarise
from streamvln.nav_stats import bootstrap_mean, mcnemar, paired, wilson


def test_wilson_matches_worked_values():
    # Wilson (1927) / Newcombe (1998) table values at z = 1.96
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    lo, hi = wilson(60, 100)
    assert lo < 0.6 < hi and hi - lo < 0.2


def test_bootstrap_is_seeded_and_covers_the_mean():
    values = [0.1, 0.9, 0.4, 0.5, 0.7, 0.2, 0.3, 0.8]
    assert bootstrap_mean(values) == bootstrap_mean(values)
    lo, hi = bootstrap_mean(values)
    assert lo < sum(values) / len(values) < hi
    assert bootstrap_mean([2.0] * 5) == (2.0, 2.0)


def test_mcnemar_exact():
    a = [1, 1, 0, 0, 0, 0, 0, 0, 1, 1]
    b = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    r = mcnemar(a, b)  # six discordant pairs, all for b: p = 2 / 2**6
    assert (r["a_only"], r["b_only"]) == (0, 6) and r["p"] == pytest.approx(2 / 64)
    assert mcnemar(a, a)["p"] == 1.0
    assert paired("success", a, b)["diff"] == pytest.approx(0.6)


def rows(successes, spl, start=0):
    return [{"scene_id": "room-unseen_0000", "episode_id": start + i, "success": float(s), "oracle_success": float(s),
             "spl": p, "ndtw": p, "navigation_error": 1 - p, "path_length": 3.0, "collisions": 0.0, "steps": 20,
             "sdtw": p} for i, (s, p) in enumerate(zip(successes, spl))]


def write_run(folder, rs, errors=0):
    folder.mkdir()
    lines = [json.dumps(r) for r in rs] + [json.dumps({"scene_id": "x", "episode_id": 999 + k, "error": "bad"})
                                           for k in range(errors)]
    (folder / "result.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_summary_reports_n_and_intervals():
    s = summarise(rows([1, 0, 1, 1], [0.9, 0.0, 0.8, 0.7]))
    assert s["episodes"] == 4 and s["success"] == 0.75
    assert s["ci95"]["success"] == pytest.approx(list(wilson(3, 4)))
    assert s["ci95"]["spl"] == list(bootstrap_mean([0.9, 0.0, 0.8, 0.7]))


def test_compare_pairs_shared_episodes(tmp_path):
    a = write_run(tmp_path / "a", rows([0] * 20, [0.0] * 20), errors=1)
    b = write_run(tmp_path / "b", rows([1] * 12 + [0] * 8, [0.8] * 12 + [0.0] * 8) + rows([1], [1.0], start=50))
    out = tmp_path / "cmp.json"
    r = CliRunner().invoke(compare_cmd, [str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "on 20 shared episodes" in r.output and "1 only in B" in r.output
    result = json.loads(out.read_text())
    sr = result["metrics"]["success"]
    assert (sr["a_only"], sr["b_only"]) == (0, 12) and sr["p"] == pytest.approx(2 / 2**12)
    assert sr["diff"] == pytest.approx(0.6) and result["metrics"]["spl"]["p"] < 0.01


def test_compare_refuses_runs_without_shared_episodes(tmp_path):
    a = write_run(tmp_path / "a", rows([1, 0], [0.5, 0.0]))
    b = write_run(tmp_path / "b", rows([1, 0], [0.5, 0.0], start=10))
    r = CliRunner().invoke(compare_cmd, [str(a), str(b)])
    assert r.exit_code != 0 and "share no episodes" in r.output
    (tmp_path / "c").mkdir()
    r = CliRunner().invoke(compare_cmd, [str(a), str(tmp_path / "c")])
    assert r.exit_code != 0 and "no result.jsonl" in r.output


def test_map_caption_carries_instruction_outcome_and_metrics():
    from streamvln.nav_eval import map_caption
    from streamvln.sim.episodes import NavEpisode

    ep = NavEpisode(7, 7, "room-unseen_0001", [0, 0, 0], [0, 0, 0, 1], [{"position": [1, 0, 1], "radius": 1.0}], [],
                    {"instruction_text": "Walk to the red ball and stop next to it."})
    m = {"success": 0.0, "stopped": 1.0, "success_distance": 1.0, "navigation_error": 1.73, "spl": 0.0,
         "ndtw": 0.41, "oracle_success": 1.0, "path_length": 3.2, "steps": 24, "collisions": 2}
    title, numbers = map_caption(ep, m)
    assert title == "7 (room-unseen_0001): Walk to the red ball and stop next to it."
    assert numbers.startswith("FAILED: stopped outside the 1 m goal radius. NE 1.73 m") and "nDTW 0.41" in numbers
    assert map_caption(ep, {**m, "stopped": 0.0})[1].startswith("FAILED: step limit reached without STOP")
    assert map_caption(ep, {**m, "success": 1.0})[1].startswith("SUCCESS")


def test_paired_table_pairs_every_run_with_the_base_and_writes_between_the_markers(tmp_path):
    import subprocess
    import sys

    control = write_run(tmp_path / "control", rows([0] * 20, [0.0] * 20), errors=1)
    better = write_run(tmp_path / "better", rows([1] * 12 + [0] * 8, [0.8] * 12 + [0.0] * 8))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- rl-table:start -->\nold\n<!-- rl-table:end -->\nafter\n")
    out = subprocess.run([sys.executable, "tools/paired_table", f"{control}=control", f"{better}=RL",
                          "--readme", str(readme), "--name", "rl-table"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    head, base, rl = out.stdout.splitlines()[0], out.stdout.splitlines()[2], out.stdout.splitlines()[3]
    assert "SR - first row" in head and base.startswith("| control | 20 | 0.000 [0.00, 0.16] |")
    assert rl.startswith("| RL | 20 | 0.600 [") and "+0.600 [" in rl and f"0, 12, p = {2 / 2**12:.2g} |" in rl
    text = readme.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text and "| RL | 20 |" in text
    # runs that share no episodes cannot be paired; a README without the named markers is refused
    apart = write_run(tmp_path / "apart", rows([1], [1.0], start=50))
    out = subprocess.run([sys.executable, "tools/paired_table", f"{control}=control", f"{apart}=RL"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "share no episodes" in out.stderr
    out = subprocess.run([sys.executable, "tools/paired_table", f"{control}=control", f"{better}=RL",
                          "--readme", str(readme), "--name", "dagger-table"], capture_output=True, text=True)
    assert out.returncode != 0 and "no <!-- dagger-table:start -->" in out.stderr
