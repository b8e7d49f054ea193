"""results/: the study runner's shell syntax, and the figures redrawn from result files."""
import json
import os
import subprocess
import sys

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


def test_readme_tables_are_the_generated_ones():
    """The README's study tables are make_figures.py --table's output on the committed files."""
    readme = (REPO / "README.md").read_text()
    for table in ("claims", "question1", "question2", "losses", "drift"):
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
