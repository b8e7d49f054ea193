"""results/: the study runner's shell syntax, and the figures redrawn from result files."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import REPO


def test_quick_study_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "results" / "quick_study.sh")], check=True)


def write_run(folder, name, summary, log=None, metrics=()):
    run = folder / name
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"summary": summary, "metrics": list(metrics)}))
    if log is not None:
        (run / "log.jsonl").write_text("".join(json.dumps(e) + "\n" for e in log))


def test_figures_are_drawn_from_result_files(tmp_path):
    study, ser = tmp_path / "study", tmp_path / "ser"
    log = [{"kind": "train", "step": s, "inv": 0.1, "equi": 0.5, "std": 0.7, "pred_std": 0.2,
            "cov": 0.1 * s} for s in (1, 2, 3)]
    log += [{"kind": "online", "step": s, "rot_r2_full": 0.1 * s, "rot_r2_inv": 0.1,
             "rot_r2_equi": 0.2} for s in (2, 3)]
    for seed in (0, 1):
        summary = {"top1/full": 0.2 + seed / 10, "rot_r2_pooled/full": 0.5}
        write_run(study, f"sie-toy-s{seed}", summary, log)
        blocks = [{"name": "equivariance", "part": f"block{b}", "value": 0.9, "chance": 0.8}
                  for b in (1, 2, 3)]
        write_run(ser, f"ser-toy-moco-s{seed}", {}, metrics=blocks)
    out = tmp_path / "assets"
    script = REPO / "results" / "make_figures.py"
    subprocess.run([sys.executable, str(script), "--study", str(study), "--ser", str(ser),
                    "--out", str(out)], check=True)
    names = sorted(os.listdir(out))
    assert names == ["study_methods.png", "study_onset.png", "study_predictor_gain.png",
                     "study_ser_equivariance.png", "study_sie_curves.png"]
    for name in names:
        with Image.open(out / name) as image:
            assert image.size[0] > 400 and image.getextrema() != ((255, 255),) * 3


def load_make_figures():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_figures",
                                                  REPO / "results" / "make_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_verdict_rules():
    figures = load_make_figures()
    # unpaired: every seed above every seed, every seed below, or overlapping
    assert figures.above([0.8, 0.9], [0.5, 0.7]) == "holds at 2 seeds"
    assert figures.above([0.2, 0.6], [0.79, 0.8, 0.81]) == "does not hold at 2 seeds"
    assert figures.above([0.2, 0.9], [0.5, 0.8]) == "inconclusive at 2 seeds"
    assert figures.above([0.9], [0.5]) == "inconclusive at 1 seed"      # one seed is not enough
    assert figures.above([], [0.5]) == "not run"
    # paired: every difference beyond the tolerance, none, or some
    assert figures.paired([0.05, 0.02]) == "holds at 2 seeds"
    assert figures.paired([0.005, -0.3]) == "does not hold at 2 seeds"
    assert figures.paired([0.2, -0.1, 0.0]) == "inconclusive at 3 seeds"
    assert figures.paired([0.2]) == "inconclusive at 1 seed"
    assert figures.all_of(["holds at 3 seeds", "holds at 2 seeds"]) == "holds at 2 seeds"
    assert figures.all_of(["holds at 2 seeds", "does not hold at 2 seeds",
                           "inconclusive at 2 seeds"]) == "does not hold at 2 seeds"
    assert figures.all_of(["holds at 2 seeds", "inconclusive at 2 seeds"]) == (
        "inconclusive at 2 seeds")


def test_claims_table_reads_the_result_files(tmp_path):
    study, ser = tmp_path / "study", tmp_path / "ser"
    chance = [{"name": "mrr", "part": "embedding", "value": 0, "chance": 0.09},
              {"name": "pre", "part": "embedding", "value": 0, "chance": 0.62},
              {"name": "rot_r2_pooled", "part": "full", "value": 0, "chance": 0.2}]
    # seeds 0 and 1 leave SIE's plateau (MRR > 1.5 x 0.09), seed 2 does not (MRR 0.09)
    for seed, (sie_r2, equimod_r2, mrr, split) in enumerate([(0.60, 0.80, 0.3, 0.05),
                                                             (0.55, 0.79, 0.25, 0.04),
                                                             (0.20, 0.78, 0.09, -0.05)]):
        write_run(study, f"sie-toy-s{seed}", {
            "rot_r2_pooled/full": sie_r2, "rot_r2_pooled/inv": sie_r2 - split,
            "rot_r2_pooled/equi": sie_r2, "mrr/embedding": mrr, "pre/embedding": 0.2,
            "top1/inv": 0.2, "top1/equi": 0.2}, metrics=chance)
        write_run(study, f"equimod-toy-s{seed}", {"rot_r2_pooled/full": equimod_r2},
                  metrics=chance[2:])
    blocks = [{"name": "equivariance", "part": f"block{b}", "value": 0.9, "chance": 0.8}
              for b in range(1, 7)]
    write_run(ser, "ser-toy-moco", {f"equivariance/block{b}": 0.9 for b in range(1, 7)},
              metrics=blocks)
    script = REPO / "results" / "make_figures.py"
    out = ""
    for table in ("claims", "question1"):
        out += subprocess.run([sys.executable, str(script), "--study", str(study), "--ser",
                               str(ser), "--table", table],
                              check=True, capture_output=True, text=True).stdout
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()
            if line.startswith("| ")}
    ordering = rows["SIE's rotation R² is above VICReg's, SimCLR's and EquiMod's"]
    assert "EquiMod 0.790 ± 0.010 (3)" in ordering
    assert ordering.endswith("vs EquiMod: does not hold at 3 seeds) |")   # 0.60 < 0.78
    split = rows["the equivariant part's rotation R² is above the invariant part's"]
    # every seed listed, the verdict drawn on the seed off the plateau (*)
    assert "equi − inv: s0* 0.050, s1* 0.040, s2 -0.050" in split
    assert split.endswith("| holds at 2 seeds |")
    assert rows["the invariant part's top-1 is above the equivariant part's"].endswith(
        "| does not hold at 2 seeds |")                                  # no difference
    assert "| 2 of 3 |" in out                                            # seeds off the plateau


def addon_run(study, name, seed, top1, block, eq2, eq6):
    """One addons-* run: its config line (the block its objective reads), linear top-1 and the
    equivariance score at blocks 2 and 6 (chance 0.5: Δeq = value - 0.5)."""
    config = {"batch_size": 64, "ser": "off" if block is None else "on", "ser_layer": block or 2}
    log = [{"kind": "config", "config": config},
           {"kind": "train", "step": 150, "images_per_s": 160.0}]
    metrics = [{"name": "equivariance", "part": f"block{b}", "value": 0.5 + eq, "chance": 0.5}
               for b, eq in ((2, eq2), (6, eq6))]
    summary = {"linear_top1/full": top1, "knn20_top1/full": 0.1, "robust_top1_rot90/full": 0.2,
               "robust_top1_blur/full": 0.1, "equivariance/block2": 0.5 + eq2,
               "equivariance/block6": 0.5 + eq6}
    write_run(study, f"{name}-s{seed}", summary, log, metrics)


def test_addon_claims_and_table_read_the_addons_runs(tmp_path, capsys):
    """SER vs each add-on unpaired, decoupled vs last block paired per seed, the equivariance
    row at each objective's own block against vanilla's same block; the table lists every seed."""
    study = tmp_path / "study"
    for seed in (0, 1):
        addon_run(study, "addons-vanilla", seed, 0.18, None, 0.05, 0.02)
        addon_run(study, "addons-ser", seed, 0.20 + seed / 100, 2, 0.15, 0.04)
        addon_run(study, "addons-augself", seed, 0.17, 6, 0.05, 0.01 + seed / 10)
        addon_run(study, "addons-augself-L2", seed, 0.175 + seed / 50, 2, 0.06, 0.02)
        addon_run(study, "addons-equimod", seed, 0.19, 6, 0.05, 0.10)
        addon_run(study, "addons-equimod-L2", seed, 0.21, 2, 0.20, 0.02)
        addon_run(study, "addons-essl", seed, 0.19, 6, 0.05, 0.03 + seed / 100)
    figures = load_make_figures()
    rows = {row[0]: row for row in figures.addon_claims(str(study))}
    matched = rows["linear-probe top-1 at matched views: SER above AugSelf (2 views)"]
    assert "SER 0.205 ± 0.007 (2: 0.200, 0.210)" in matched[3]
    assert matched[4] == "holds at 2 seeds"
    assert rows["the same, 3 views: SER (2 views) above EquiMod"][4] == "holds at 2 seeds"
    assert rows["the same, 2+4 views: SER 2+4 above E-SSL"][4] == "not run"      # no SER 2+4
    decoupling = "linear-probe top-1 (its objective at block 2 of 6 instead of the last)"
    equimod = rows[f"layer decoupling raises EquiMod's {decoupling}"]
    assert "block 2 − last: s0 0.020, s1 0.020" in equimod[3] and equimod[4] == "holds at 2 seeds"
    augself = rows[f"layer decoupling raises AugSelf's {decoupling}"]
    assert "s0 0.005, s1 0.025" in augself[3] and augself[4] == "inconclusive at 2 seeds"
    equivariance = rows["each objective raises the equivariance score of the block it "
                        "regularises over vanilla's same block"]
    assert ("block 6: vanilla 0.020 ± 0.000 (2), AugSelf 0.060 ± 0.071 (2), EquiMod 0.100 ± "
            "0.000 (2)") in equivariance[3]
    assert equivariance[4].startswith("inconclusive at 2 seeds (SER: holds at 2 seeds; AugSelf: "
                                      "inconclusive at 2 seeds;")
    # E-SSL's rotated crops reach its rotation head only: its vanilla is the 2-view one
    assert ("EquiMod: holds at 2 seeds; EquiMod, decoupled: holds at 2 seeds; E-SSL: holds at 2 "
            "seeds; SER 2+4: not run") in equivariance[4]
    figures.main(["--table", "addons", "--study", str(study)])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 7 and all(line.count("|") == 10 for line in lines)
    assert lines[3] == ("| SER (addons-ser) | 2 | 2 | 0.205 ± 0.007 (2: 0.200, 0.210) | "
                        "0.100 ± 0.000 (2: 0.100, 0.100) | 0.150 ± 0.000 (2: 0.150, 0.150) | "
                        "0.150 ± 0.000 (2: 0.150, 0.150) | 0.040 ± 0.000 (2: 0.040, 0.040) | 1.0 |")
    assert lines[2].startswith("| vanilla (addons-vanilla) | 2 | none |")
    ser, out = tmp_path / "ser", tmp_path / "assets"                 # the figure
    write_run(ser, "ser-toy-moco", {})
    figures.main(["--study", str(study), "--ser", str(ser), "--out", str(out)])
    with Image.open(out / "study_addons_equivariance.png") as image:
        assert image.size[0] > 400 and image.getextrema() != ((255, 255),) * 3


@pytest.mark.parametrize("readme_path, tables", [
    ("results/README.md",
     ("claims", "question1", "question2", "losses", "drift", "time", "addons")),
    ("README.md", ("default",))])
def test_readme_tables_are_the_generated_ones(readme_path, tables):
    """The study's tables (results/README.md) and the first screen's (README.md) are
    make_figures.py --table's output on the committed files."""
    readme = (REPO / readme_path).read_text()
    for table in tables:
        start = f"<!-- table: python results/make_figures.py --table {table} -->"
        assert start in readme, table
        committed = readme.split(start)[1].split("<!-- end of table -->")[0].strip()
        generated = subprocess.run([sys.executable, str(REPO / "results" / "make_figures.py"),
                                    "--table", table], check=True, capture_output=True,
                                   text=True, cwd=REPO).stdout.strip()
        assert committed == generated, table


def test_predictor_drift_pieces_resume_and_measure_from_the_init(toy_root, tmp_path):
    """Two 1-epoch pieces: one line each, H0 rebuilt as sie.py builds it (the script checks the
    first piece against it), and a rerun adds nothing."""
    script = REPO / "results" / "predictor_drift.py"
    command = [sys.executable, str(script), str(tmp_path / "run"), str(tmp_path / "out"),
               "--every", "1", "--", "--data-root", toy_root, "--epochs", "2", "--batch-size", "8",
               "--mlp", "64-64-64", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for _ in range(2):
        subprocess.run(command, check=True, capture_output=True, env=env)
        rows = [json.loads(line) for line in open(tmp_path / "out" / "drift.jsonl")]
        assert [row["step"] for row in rows] == [2, 4]         # 16 training objects / batch 8
    assert rows[0]["rms_h0"] == rows[1]["rms_h0"]
    assert 0 < rows[0]["rms_drift"] < rows[1]["rms_drift"]
    assert "--every 1 -- --data-root" in (tmp_path / "out" / "command.txt").read_text()


# ---------------------------------------------------------------- bad input: one message, exit 2
def figures_error(argv, capsys):
    """make_figures.main(argv) must end in one 'make_figures.py: error:' line and exit code 2."""
    import pytest
    figures = load_make_figures()
    with pytest.raises(SystemExit) as e:
        figures.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert err.startswith("make_figures.py: error:") and len(err.strip().splitlines()) == 1, err
    return err


def small_study(tmp_path):
    """A study folder with one SIE run (log with train and online lines) and a SER folder."""
    study, ser = tmp_path / "study", tmp_path / "ser"
    log = [{"kind": "config", "config": {"batch_size": 4}}]
    log += [{"kind": "train", "step": s, "inv": 0.1, "equi": 0.5, "std": 0.7, "pred_std": 0.2,
             "cov": 0.1, "pairs_per_s": 8.0} for s in (10, 20)]
    log += [{"kind": "online", "step": 20, "rot_r2_full": 0.3, "rot_r2_inv": 0.3,
             "rot_r2_equi": 0.3}]
    write_run(study, "sie-toy-s0", {"rot_r2_pooled/full": 0.5}, log)
    ser_log = [{"kind": "config", "config": {"batch_size": 8}},
               {"kind": "train", "step": 10, "images_per_s": 4.0},
               {"kind": "train", "step": 30, "images_per_s": 4.0}]
    write_run(ser, "ser-toy-moco", {}, ser_log)
    return study, ser


def test_make_figures_refuses_a_missing_or_empty_study_and_leaves_the_readme(tmp_path, capsys):
    """A --study typo used to turn every README table into 'not run' and exit 0."""
    study, ser = small_study(tmp_path)
    readme = tmp_path / "README.md"
    text = ("x\n<!-- table: python results/make_figures.py --table losses -->\nold\n"
            "<!-- end of table -->\ny\n")
    readme.write_text(text)
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (tmp_path / "typo", empty):
        err = figures_error(["--readme", readme, "--study", folder, "--ser", ser], capsys)
        assert f"--study {folder}" in err
        err = figures_error(["--table", "claims", "--study", study, "--ser", folder], capsys)
        assert f"--ser {folder}" in err
        assert f"--study {folder}" in figures_error(["--table", "losses", "--study", folder],
                                                      capsys)
    assert readme.read_text() == text
    load_make_figures().main(["--readme", str(readme), "--study", str(study), "--ser", str(ser)])
    assert "| sie-toy-s0 | 0.700 |" in readme.read_text()           # a good study rewrites it


def test_make_figures_names_the_bad_file(tmp_path, capsys):
    """Truncated eval.json, torn log line, a curves run with no online lines, a start marker
    without its end, a missing --readme, an --out that is a file, a null online_r2."""
    study, ser = small_study(tmp_path)
    run = study / "sie-toy-s0"
    good_eval, good_log = (run / "eval.json").read_text(), (run / "log.jsonl").read_text()
    (run / "eval.json").write_text(good_eval[:20])
    assert str(run / "eval.json") in figures_error(
        ["--table", "question1", "--study", study], capsys)
    (run / "eval.json").write_text(good_eval)
    (run / "log.jsonl").write_text(good_log + '{"kind": "tra')
    assert f"{run / 'log.jsonl'}, line 5" in figures_error(
        ["--table", "losses", "--study", study], capsys)
    (run / "log.jsonl").write_text("".join(line + "\n" for line in good_log.splitlines()
                                           if '"online"' not in line))
    assert str(run / "log.jsonl") in figures_error(
        ["--study", study, "--ser", ser, "--curves-run", "sie-toy-s0", "--out",
         tmp_path / "png"], capsys)
    (run / "log.jsonl").write_text(good_log)
    readme = tmp_path / "README.md"
    text = "<!-- table: python results/make_figures.py --table losses -->\nold\n"
    readme.write_text(text)
    assert str(readme) in figures_error(["--readme", readme, "--study", study, "--ser", ser],
                                        capsys)
    assert readme.read_text() == text
    missing = tmp_path / "no-such-README.md"
    assert str(missing) in figures_error(["--readme", missing, "--study", study, "--ser", ser],
                                         capsys)
    assert not missing.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    assert f"--out {a_file}" in figures_error(["--study", study, "--ser", ser, "--out", a_file],
                                              capsys)
    assert a_file.read_text() == "mine\n"
    drift = study / "sie-toy-drift-s0"
    drift.mkdir()
    (drift / "drift.jsonl").write_text(json.dumps(
        {"epoch": 20, "step": 100, "rms_h0": 0.3, "rms_drift": 0.01, "online_r2": None}) + "\n")
    assert f"{drift / 'drift.jsonl'}, line 1" in figures_error(
        ["--table", "drift", "--study", study], capsys)


def test_time_table_counts_ser_runs(tmp_path, capsys):
    """SER logs images_per_s (older logs: img_per_s), not pairs_per_s; each counted."""
    study, ser = small_study(tmp_path)
    write_run(ser, "ser-toy-moco-s1", {}, [{"kind": "config", "config": {"batch_size": 8}},
                                           {"kind": "train", "step": 45, "img_per_s": 4.0}])
    load_make_figures().main(["--table", "time", "--study", str(study), "--ser", str(ser)])
    rows = capsys.readouterr().out.splitlines()
    # sie: 20 steps x 4 / 8 per s = 10 s; ser: 30 x 8 / 4 = 60 s and 45 x 8 / 4 = 90 s
    hours = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[2].rstrip(" |") for row in rows[2:]}
    assert hours == {str(study): f"{10 / 3600:.1f}", str(ser): f"{150 / 3600:.1f}"}
    figures = load_make_figures()
    assert figures.training_seconds(str(ser / "ser-toy-moco" / "log.jsonl")) == 60.0
    assert figures.training_seconds(str(ser / "ser-toy-moco-s1" / "log.jsonl")) == 90.0


# ---------------------------------------------------------------- quick_study.sh, with stubs
STUB = '''import json, os, sys
name = os.path.basename(sys.argv[0])
argv = sys.argv[1:]
with open(os.path.join(os.environ["STUB_LOG"]), "a") as f:
    f.write(name + " " + " ".join(argv) + "\\n")
def after(flag):
    return argv[argv.index(flag) + 1]
if name == "data.py":
    if os.environ.get("STUB_FAIL_DATA"):
        sys.exit("data.py: error: no space left")
    os.makedirs(argv[1])
elif name == "predictor_drift.py":
    os.makedirs(argv[1], exist_ok=True)
    open(os.path.join(argv[1], "command.txt"), "w").write("drift\\n")
elif name == "eval.py":
    os.makedirs(after("--out"), exist_ok=True)
    open(os.path.join(after("--out"), "eval.json"), "w").write('{"summary": {}}')
else:
    if os.environ.get("STUB_FAIL"):
        sys.exit(name + ": error: something broke")
    run = after("--run-dir")
    os.makedirs(run, exist_ok=True)
    open(os.path.join(run, "log.jsonl"), "w").write('{"kind": "config"}\\n')
    open(os.path.join(run, "eval.json"), "w").write('{"summary": {}}')
'''
# the run list of the tests: every kind of step, two data sets made on demand
MINI_STUDY = '''
dataset data/3diebench-1k --classes 10 --objects-per-class 100
run sie-toy-s0          sie.py --seed 0
embeddings sie-toy-s0
ood sie-toy-s0
run sie-1k-s0           sie.py --seed 0 --data-root data/3diebench-1k
run ser-moco-s0         ser.py --base moco
drift sie-toy-drift-s0  --seed 0
report
'''
RUNS_MARKER = "# ---------------------------------------------------------------- the runs"


def stub_study(tmp_path):
    """A checkout whose scripts are stubs (each logs its command to calls.log) and whose
    quick_study.sh has the real functions and MINI_STUDY as its run list."""
    root = tmp_path / "checkout"
    (root / "results").mkdir(parents=True)
    (root / "bin").mkdir()
    script = (REPO / "results" / "quick_study.sh").read_text()
    assert RUNS_MARKER in script
    (root / "results" / "quick_study.sh").write_text(script.split(RUNS_MARKER)[0] + MINI_STUDY)
    for name in ("sie.py", "baselines.py", "ser.py", "eval.py", "data.py",
                 "results/predictor_drift.py"):
        (root / name).write_text(STUB)
    python = root / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, PATH=f"{root / 'bin'}:{os.environ['PATH']}",
               STUB_LOG=str(root / "calls.log"))
    env.pop("LANES", None)
    return root, env


def study(root, env, **extra):
    return subprocess.run(["bash", str(root / "results" / "quick_study.sh")], cwd=root,
                          env=dict(env, **extra), capture_output=True, text=True, timeout=60)


def calls(root):
    path = root / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def test_quick_study_names_failed_runs_and_exits_nonzero(tmp_path):
    root, env = stub_study(tmp_path)
    for lanes in ("1", "2"):
        proc = study(root, env, STUB_FAIL="1", LANES=lanes)
        assert proc.returncode == 1, proc.stderr
        for name in ("sie-toy-s0", "sie-1k-s0", "ser-moco-s0"):
            assert name in proc.stderr, (lanes, proc.stderr)
        assert not (root / "results" / "study" / "sie-toy-s0").exists()
    root, env = stub_study(tmp_path / "fresh")
    proc = study(root, env, STUB_FAIL_DATA="1")              # no data set can be made
    assert proc.returncode == 1, proc.stderr
    for name in ("sie-toy-s0", "sie-1k-s0", "sie-toy-drift-s0"):
        assert name in proc.stderr, proc.stderr
    assert not [c for c in calls(root) if c.startswith("sie.py")]     # nothing trained


def test_quick_study_rerun_of_a_finished_study_generates_nothing(tmp_path):
    root, env = stub_study(tmp_path)
    proc = study(root, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    made = [c for c in calls(root) if c.startswith("data.py")]
    assert sorted(c.split()[2] for c in made) == ["data/3diebench-1k", "data/3diebench-toy",
                                                  "data/3diebench-toy-ood"]
    results = root / "results" / "study"
    assert sorted(os.listdir(results / "sie-toy-s0")) == ["command.txt", "eval.json",
                                                          "log.jsonl"]
    assert (results / "sie-toy-z-s0" / "eval.json").exists()
    assert (results / "sie-toy-drift-s0" / "command.txt").exists()
    for folder in ("data/3diebench-toy", "data/3diebench-toy-ood", "data/3diebench-1k"):
        os.rmdir(root / folder)                       # a fresh clone: results, but no data sets
    before = calls(root)
    proc = study(root, env)
    assert proc.returncode == 0 and calls(root) == before, calls(root)[len(before):]


def test_quick_study_reruns_a_run_whose_eval_json_is_truncated(tmp_path):
    root, env = stub_study(tmp_path)
    assert study(root, env).returncode == 0
    result = root / "results" / "study" / "sie-toy-s0" / "eval.json"
    result.write_text('{"summ')
    before = len(calls(root))
    proc = study(root, env)
    assert proc.returncode == 0, proc.stderr
    again = calls(root)[before:]
    assert again == ["sie.py --seed 0 --run-dir runs/study/sie-toy-s0"], again
    assert json.loads(result.read_text()) == {"summary": {}}
    assert not [p for p in (root / "results").rglob("*.partial")]


def test_quick_study_refuses_a_lanes_that_is_not_a_count(tmp_path):
    root, env = stub_study(tmp_path)
    for lanes in ("abc", "0", "-1", "2 3", "1.5"):
        proc = study(root, env, LANES=lanes)
        assert proc.returncode == 2 and f"LANES={lanes}" in proc.stderr, (lanes, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and not calls(root), proc.stderr


# ---------------------------------------------------------------- predictor_drift.py, bad input
def drift_error(argv, capsys):
    import importlib.util
    import pytest
    spec = importlib.util.spec_from_file_location("predictor_drift",
                                                  REPO / "results" / "predictor_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as e:
        module.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err
    return err


def test_predictor_drift_bad_input_is_one_message_before_any_training(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "out"
    sie = ["--", "--epochs", "4"]
    for every in ("0", "-1", "x"):
        assert "--every" in drift_error([run, out, "--every", every, *sie], capsys)
    assert "--every 5" in drift_error([run, out, "--every", "5", *sie], capsys)  # > --epochs
    assert "--every 3" in drift_error([run, out, "--every", "3", *sie], capsys)  # 4 % 3
    assert "--predictor mlp" in drift_error([run, out, "--every", "2", *sie, "--predictor",
                                             "mlp"], capsys)
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    assert str(a_file) in drift_error([run, a_file, "--every", "2", *sie], capsys)
    assert a_file.read_text() == "mine\n"
    out.mkdir()
    (out / "drift.jsonl").write_text('{"epoch": 2, "step": 10, "rms_h": 0.2}\n{"epoch": 4, "st')
    assert f"{out / 'drift.jsonl'}, line 2" in drift_error([run, out, "--every", "2", *sie],
                                                            capsys)
    assert not run.exists() and not (out / "command.txt").exists()
