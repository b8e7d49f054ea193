"""The study's figures and tables, from the committed result files (PIL: it ships with torchvision)

    python results/make_figures.py                      # writes assets/study_*.png

- assets/study_sie_curves.png: one SIE run's loss terms and the online monitor's rotation R² per
  part over training (results/study/<run>/log.jsonl);
- assets/study_onset.png: the online monitor's rotation R² over training for every seed of SIE
  and EquiMod-SimCLR at 700 and 2,800 steps (results/study/<run>/log.jsonl);
- assets/study_predictor_gain.png: the same for SIE at 700 steps with PyTorch's init of the
  hypernetwork (sie-toy) and with H drawn from N(0, G^2 / d), G = 1.6, 1, 0.5, 0 (sie-gain<G>);
- assets/study_methods.png: per-method bars of top-1 and pooled rotation R², mean over seeds
  (results/study/*/eval.json);
- assets/study_ser_equivariance.png: SER's Δ-equivariance per block for each configuration, mean
  over seeds (results/ser-toy/*/eval.json);
- assets/study_addons_equivariance.png: the same for SER and the add-ons it is compared with
  (results/study/addons-*/eval.json).
A run directory name ending in -s<seed> is one seed of the configuration named by the rest.
`--table NAME` prints one of the study's tables instead (claims, question1, question2,
losses: per SIE run, the unweighted loss terms averaged over its last 10 log lines; drift: how
far the hypernetwork moves from its initialisation, from results/predictor_drift.py; time: the
training time the result folders hold, from each log's throughput: pairs_per_s or images_per_s;
default: the README's first-screen runs of `python sie.py`, from results/default_runs.sh;
addons: SER and the add-ons it is compared with, every seed);
`--readme results/README.md` rewrites those tables in the study's README, between their marker
lines. A missing or empty result folder, or a result file that cannot be read, is one message
naming it and exit code 2; the README is then left as it was.
"""
import argparse
import contextlib
import glob
import io
import json
import os
import re
import shutil
import tempfile

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
FONT = ImageFont.load_default()


# ---- reading the result files: a file that cannot be used is one message naming it ----
class BadInput(Exception):
    """A flag or result file this script cannot use; main() prints it as one line, exit 2."""


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError:
        raise BadInput(f"{path}: not valid JSON (truncated by a kill or a full disk?); rerun "
                       "that run or remove its folder") from None


def read_eval(path):
    """An eval.json, checked for what the tables read: a summary of numbers, and metric records
    with a name, a part, a value and a chance level."""
    result = read_json(path)
    summary = result.get("summary") if isinstance(result, dict) else None
    metrics = result.get("metrics") if isinstance(result, dict) else None
    good = (isinstance(summary, dict) and isinstance(metrics, list)
            and all(isinstance(v, (int, float, type(None))) for v in summary.values())
            and all(isinstance(r, dict) and isinstance(r.get("name"), str)
                    and isinstance(r.get("part"), str)
                    and isinstance(r.get("value"), (int, float, type(None)))
                    and isinstance(r.get("chance"), (int, float, type(None))) for r in metrics))
    if not good:
        raise BadInput(f"{path}: not an eval.json of eval.py (no 'summary' of numbers and "
                       "'metrics' records)")
    return result


def read_jsonl(path, kind_required=True):
    """One JSON object per line. log.jsonl lines carry a 'kind' (and train/online lines a
    step); a line torn by a kill is named, not skipped, so no table silently loses it."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise BadInput(f"{path}: cannot read it ({e.strerror})") from None
    entries = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        good = isinstance(entry, dict) and (not kind_required or (
            isinstance(entry.get("kind"), str) and (entry["kind"] not in ("train", "online")
                                                    or isinstance(entry.get("step"), int))))
        if not good:
            raise BadInput(f"{path}, line {number}: not a complete JSON record (torn by a kill?); "
                           "remove that line or rerun the run")
        entries.append(entry)
    return entries


def configuration(run_dir):
    """'sie-toy-s1' -> 'sie-toy': the name without its seed suffix."""
    return re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(run_dir)))


def mean(values):
    return sum(values) / len(values)


def summaries_by_configuration(pattern):
    """{configuration: [eval.json summary of each seed]} for the run dirs matching pattern."""
    groups = {}
    for path in sorted(glob.glob(os.path.join(pattern, "eval.json"))):
        result = read_eval(path)
        groups.setdefault(configuration(os.path.dirname(path)), []).append(result)
    return groups


# ---- a minimal plot: axes, ticks, lines, bars, a legend ----
class Plot:
    """One panel with data coordinates mapped into a pixel box of an image."""

    def __init__(self, draw, box, x_range, y_range, title, x_label, y_label):
        self.draw, self.box = draw, box
        self.x_range, self.y_range = x_range, y_range
        left, top, right, bottom = box
        draw.rectangle(box, outline=(0, 0, 0))
        draw.text((left, top - 14), title, fill=(0, 0, 0), font=FONT)
        x_label_at = (left + (right - left) // 2 - 20, bottom + 16)
        draw.text(x_label_at, x_label, fill=(0, 0, 0), font=FONT)
        draw.text((left - 45, top - 14), y_label, fill=(0, 0, 0), font=FONT)
        for i in range(5):                                   # 5 y ticks with their values
            value = y_range[0] + (y_range[1] - y_range[0]) * i / 4
            y = self.y(value)
            draw.line((left - 3, y, left, y), fill=(0, 0, 0))
            draw.text((left - 40, y - 5), f"{value:.2f}", fill=(0, 0, 0), font=FONT)
        if x_label:                                          # the x range's two ends
            draw.text((left, bottom + 3), f"{x_range[0]:g}", fill=(0, 0, 0), font=FONT)
            draw.text((right - 24, bottom + 3), f"{x_range[1]:g}", fill=(0, 0, 0), font=FONT)

    def x(self, value):
        left, _, right, _ = self.box
        low, high = self.x_range
        return left + (value - low) / (high - low or 1) * (right - left)

    def y(self, value):
        _, top, _, bottom = self.box
        low, high = self.y_range
        return bottom - (value - low) / (high - low or 1) * (bottom - top)

    def line(self, xs, ys, colour):
        points = [(self.x(a), self.y(b)) for a, b in zip(xs, ys)]
        if len(points) > 1:
            self.draw.line(points, fill=colour, width=2)

    def bar(self, x_left, x_right, height, colour):
        self.draw.rectangle((self.x(x_left), self.y(height), self.x(x_right), self.y(0)),
                            fill=colour)

    def legend(self, names, right=False):
        left, top, box_right, _ = self.box
        if right:                                            # the top-right corner instead
            left = box_right - 20 - 6 * max(len(name) for name in names)
        for i, name in enumerate(names):
            y = top + 6 + 12 * i
            self.draw.rectangle((left + 6, y, left + 14, y + 8), fill=COLOURS[i % len(COLOURS)])
            self.draw.text((left + 18, y - 2), name, fill=(0, 0, 0), font=FONT)


def value_range(values, pad=0.05):
    low, high = min(values), max(values)
    margin = (high - low) * pad or 0.1
    return low - margin, high + margin


# ---- the figures ----
def sie_curves(log_path, out_png):
    """Loss terms (left) and the online rotation R² per part (right) over training."""
    log = read_jsonl(log_path)
    train = [e for e in log if e["kind"] == "train"]
    online = [e for e in log if e["kind"] == "online"]
    terms = ["inv", "equi", "std", "pred_std", "cov"]
    if not online or not train or not all(t in e for e in train for t in terms):
        raise BadInput(f"{log_path}: no SIE 'train' lines with {', '.join(terms)} and 'online' "
                       "lines to draw (a run of sie.py that finished an epoch); pick another "
                       "with --curves-run")
    parts = [k[len("rot_r2_"):] for k in online[0] if k.startswith("rot_r2_")]
    image = Image.new("RGB", (900, 340), "white")
    draw = ImageDraw.Draw(image)
    steps = [e["step"] for e in train]
    loss_values = [e[t] for e in train for t in terms]
    left = Plot(draw, (60, 30, 430, 300), (0, max(steps)), value_range(loss_values),
                "SIE loss terms (unweighted)", "step", "")
    for i, term in enumerate(terms):
        left.line(steps, [e[term] for e in train], COLOURS[i])
    left.legend(terms)
    online_steps = [e["step"] for e in online]
    r2_values = [e[f"rot_r2_{p}"] for e in online for p in parts]
    right = Plot(draw, (510, 30, 880, 300), (0, max(online_steps)), value_range(r2_values),
                 "online monitor: rotation R2 per part (training pairs)", "step", "")
    for i, part in enumerate(parts):
        right.line(online_steps, [e[f"rot_r2_{part}"] for e in online], COLOURS[i])
    right.legend(parts)
    image.save(out_png)


def onset_curves(study, out_png, configurations=("sie-toy", "equimod-toy", "sie-2800steps",
                                                 "equimod-2800steps")):
    """The online monitor's rotation R² over training, one line per run (SIE: its equivariant
    part), coloured by configuration: when each run leaves the constant level."""
    curves = {}
    for name in configurations:
        for path in sorted(glob.glob(os.path.join(study, f"{name}-s*", "log.jsonl"))):
            online = [e for e in read_jsonl(path) if e["kind"] == "online"]
            if not online:                         # not one epoch finished yet: nothing to draw
                continue
            curves.setdefault(name, []).append(
                ([e["step"] for e in online],
                 [e.get("rot_r2_equi", e.get("rot_r2_full")) for e in online]))
    if not curves:
        return
    last = max(max(steps) for runs in curves.values() for steps, _ in runs)
    image = Image.new("RGB", (700, 360), "white")
    draw = ImageDraw.Draw(image)
    plot = Plot(draw, (60, 30, 680, 320), (0, last), (0, 1),
                "online rotation R2 (training pairs; SIE: equivariant part), one line per seed",
                "step", "")
    names = list(curves)
    for i, name in enumerate(names):
        for steps, r2 in curves[name]:
            plot.line(steps, [max(0.0, v) for v in r2], COLOURS[i])
    plot.legend(names)
    image.save(out_png)


# the configurations the per-method figure compares: every method at the toy preset, then SIE and
# EquiMod at 2 and 4 times the steps
METHOD_BARS = ("vicreg-toy", "simclr-toy", "equimod-toy", "sie-toy", "equimod-1400steps",
               "sie-1400steps", "equimod-2800steps", "sie-2800steps")


def method_bars(pattern, out_png, metrics=("top1/full", "rot_r2_pooled/full")):
    """One panel per metric: a bar per configuration, the mean over its seeds (dots: each seed)."""
    groups = summaries_by_configuration(pattern)
    names = [name for name in METHOD_BARS if name in groups]
    image = Image.new("RGB", (460 * len(metrics), 380), "white")
    draw = ImageDraw.Draw(image)
    for m, metric in enumerate(metrics):
        seeds = {name: [r["summary"][metric] for r in groups[name] if metric in r["summary"]]
                 for name in names}
        shown = [name for name in names if seeds[name]]
        if not shown:
            continue
        top = max(max(values) for values in seeds.values() if values)
        plot = Plot(draw, (60 + 460 * m, 30, 430 + 460 * m, 280), (0, len(shown)),
                    (0, top * 1.1), f"{metric}, mean over seeds", "", "")
        for i, name in enumerate(shown):
            plot.bar(i + 0.15, i + 0.85, mean(seeds[name]), COLOURS[i % len(COLOURS)])
            for value in seeds[name]:
                x, y = plot.x(i + 0.5), plot.y(value)
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 0, 0))
            draw.text((plot.x(i + 0.1), 288 + 12 * (i % 6)), name, fill=(0, 0, 0), font=FONT)
    image.save(out_png)


def ser_equivariance(pattern, out_png, title="SER: delta-equivariance (value - no-rho "
                                             "reference) per block, mean over seeds",
                     legend_right=False):
    """Δeq (the value minus its no-ρ reference) per block, one line per configuration."""
    groups = summaries_by_configuration(pattern)
    curves = {}
    for name, results in groups.items():
        per_seed = []
        for result in results:
            blocks = {int(r["part"][len("block"):]): r["value"] - r["chance"]
                      for r in result["metrics"] if r["name"] == "equivariance"}
            per_seed.append([blocks[b] for b in sorted(blocks)])
        if all(per_seed):                           # a run without the protocol: not drawn
            curves[name] = [mean(values) for values in zip(*per_seed)]
    if not curves:
        return
    depth = max(len(c) for c in curves.values())
    image = Image.new("RGB", (560, 340), "white")
    draw = ImageDraw.Draw(image)
    all_values = [v for c in curves.values() for v in c]
    plot = Plot(draw, (60, 30, 540, 300), (1, depth), value_range(all_values), title, "block", "")
    names = sorted(curves)
    for i, name in enumerate(names):
        plot.line(range(1, len(curves[name]) + 1), curves[name], COLOURS[i])
    plot.legend(names, right=legend_right)
    image.save(out_png)


def loss_table(pattern, last=10, terms=("std", "cov", "equi", "inv", "pred_std")):
    """A markdown row per SIE run: each loss term's mean over the run's last `last` train lines."""
    print("| run | " + " | ".join(terms) + " |")
    print("|---" * (len(terms) + 1) + "|")
    for path in sorted(glob.glob(os.path.join(pattern, "log.jsonl"))):
        train = [e for e in read_jsonl(path) if e["kind"] == "train"][-last:]
        if not train or not all(t in train[0] for t in terms):
            continue
        means = [mean([e[t] for e in train]) for t in terms]
        name = os.path.basename(os.path.dirname(path))
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in means) + " |")


# ---- the README's tables: every number read from the result files ----
def runs_of(folder, configuration_name):
    """{seed: eval.json} of the runs folder/<configuration_name>-s<seed> (a run directory named
    <configuration_name> alone is seed 0, as in results/ser-toy)."""
    found = {}
    for path in glob.glob(os.path.join(folder, f"{configuration_name}*", "eval.json")):
        name = os.path.basename(os.path.dirname(path))
        match = re.fullmatch(re.escape(configuration_name) + r"(-s(\d+))?", name)
        if match:
            found[int(match.group(2) or 0)] = read_eval(path)
    return dict(sorted(found.items()))


def value(result, key):
    """A summary value ('rot_r2_pooled/full'), or a mean over several keys given as a prefix
    ending in '*' ('robust_top1_*/full': the mean over the corruptions)."""
    summary = result["summary"]
    if "*" not in key:
        return summary.get(key)
    head, tail = key.split("*")
    matches = [v for k, v in summary.items() if k.startswith(head) and k.endswith(tail)]
    return mean(matches) if matches else None


def chance(result, key):
    """The chance level eval.py recorded for a metric (its best constant predictor)."""
    name, part = key.split("/")
    for r in result["metrics"]:
        if r["name"] == name and r["part"] == part:
            return r["chance"]
    return None


def seeds_of(folder, configuration_name, key):
    """{seed: value} for one metric of one configuration, the seeds that have it."""
    found = {s: value(r, key) for s, r in runs_of(folder, configuration_name).items()}
    return {s: v for s, v in found.items() if v is not None}


def spread(values):
    """'0.601 ± 0.288 (n)': mean ± sample std over seeds."""
    values = list(values)
    if not values:
        return "not run"
    m = mean(values)
    if len(values) == 1:
        return f"{m:.3f} (1)"
    std = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.3f} ± {std:.3f} ({len(values)})"


# A claim's verdict, by rules stated once (results/README.md, "How a verdict is drawn"):
# - A above B, unpaired: holds if every seed of A is above every seed of B, does not hold if every
#   seed of A is below every seed of B, inconclusive otherwise;
# - paired (the same seed with and without a change): holds if every seed's difference exceeds
#   TOLERANCE in the claimed direction, does not hold if none does, inconclusive otherwise;
# - one seed is never enough: inconclusive at 1 seed. A verdict says how many seeds it rests on.
TOLERANCE = 0.01
COLLAPSED = 0.05     # a per-output rotation R² below this is read as no better than the mean
HOLDS, FAILS = "holds", "does not hold"


def inconclusive(n):
    return f"inconclusive at {n} seed{'s' if n != 1 else ''}"


def above(a, b):
    """Unpaired verdict for 'a is above b' (lists of per-seed values)."""
    if not a or not b:
        return "not run"
    n = min(len(a), len(b))
    if n >= 2 and min(a) > max(b):
        return f"{HOLDS} at {n} seeds"
    if n >= 2 and max(a) < min(b):
        return f"{FAILS} at {n} seeds"
    return inconclusive(n)


def paired(differences):
    """Paired verdict from per-seed differences, positive = the claimed direction."""
    n = len(differences)
    if not n:
        return "not run"
    if n >= 2 and min(differences) > TOLERANCE:
        return f"{HOLDS} at {n} seeds"
    if n >= 2 and max(differences) <= TOLERANCE:
        return f"{FAILS} at {n} seeds"
    return inconclusive(n)


def all_of(verdicts):
    """One verdict for a claim made of several comparisons: holds if all hold, does not hold if
    any does not, else the first inconclusive one."""
    if all(v.startswith(HOLDS) for v in verdicts):           # "holds at n seeds": the least n
        return f"{HOLDS} at {min(int(v.split()[2]) for v in verdicts)} seeds"
    failing = [v for v in verdicts if v.startswith(FAILS)]
    if failing:
        return failing[0]
    return next(v for v in verdicts if not v.startswith(HOLDS))


R2, R2_INV, R2_EQUI = "rot_r2_pooled/full", "rot_r2_pooled/inv", "rot_r2_pooled/equi"
POSE_MARGIN = 0.05   # a rotation R² this far above its constant predictor's: some pose learned


def some_pose(folder, configuration_name):
    """Whether any seed's pooled rotation R² is POSE_MARGIN above the best constant's."""
    return any(value(r, R2) > chance(r, R2) + POSE_MARGIN
               for r in runs_of(folder, configuration_name).values())


def ordering(folder, sie, equimod):
    """above() for SIE's R² vs EquiMod's, unless neither learned any pose: nothing to order."""
    if not some_pose(folder, sie) and not some_pose(folder, equimod):
        return "neither learns the pose"
    return above(values(folder, sie, R2), values(folder, equimod, R2))


OFF_PLATEAU = 1.5    # an SIE run is off its plateau when its MRR exceeds 1.5 x chance


def learned(result):
    """Off the plateau: the predictor retrieves the target view clearly better than chance."""
    return value(result, "mrr/embedding") > OFF_PLATEAU * chance(result, "mrr/embedding")


def off_plateau_seeds(folder, configuration_name):
    return {s for s, r in runs_of(folder, configuration_name).items() if learned(r)}


def per_seed_differences(folder, config_a, key_a, config_b, key_b, seeds=None):
    """value(a) - value(b) for every seed both configurations (or both keys) have, or for those
    of `seeds` only."""
    a, b = seeds_of(folder, config_a, key_a), seeds_of(folder, config_b, key_b)
    return [a[s] - b[s] for s in a if s in b and (seeds is None or s in seeds)]


def fmt(values):
    return ", ".join(f"{v:.3f}" for v in values)


def values(folder, configuration_name, key):
    return list(seeds_of(folder, configuration_name, key).values())


def delta_eq(result, block):
    """SER's Δ-equivariance at a block: the score minus its no-ρ reference (eval.py)."""
    key = f"equivariance/block{block}"
    return value(result, key) - chance(result, key)


def delta_eq_values(folder, configuration_name, block):
    return [delta_eq(r, block) for r in runs_of(folder, configuration_name).values()]


def verdict_with_details(comparisons):
    """comparisons: {label: verdict} -> 'overall (label: verdict; ...)'."""
    overall = all_of(list(comparisons.values()))
    if len(comparisons) == 1:
        return overall
    return overall + " (" + "; ".join(f"{k}: {v}" for k, v in comparisons.items()) + ")"


TOY = "toy set, 700 steps"
SEQ_JEPA_HIGH = "seq-JEPA Table 11: official SIE scale"
SEQ_JEPA_LOW = "seq-JEPA Table 1: 128 px, batch 512, 1,000 epochs"


def sie_claims(study):
    """The SIE paper's claims as rows: (claim, source, theirs, ours, verdict)."""
    rows = []
    baselines = {"VICReg": "vicreg", "SimCLR": "simclr", "EquiMod": "equimod"}
    sie = values(study, "sie-toy", R2)
    others = {label: values(study, f"{name}-toy", R2) for label, name in baselines.items()}
    ours = f"{TOY}, R²: SIE {spread(sie)}; " + "; ".join(
        f"{label} {spread(v)}" for label, v in others.items())
    rows.append(("SIE's rotation R² is above VICReg's, SimCLR's and EquiMod's",
                 "SIE Sec. 5, Table 1",
                 f"SIE 0.721, EquiMod 0.492, SimCLR 0.473 ({SEQ_JEPA_HIGH}); SIE 0.58, EquiMod "
                 f"0.32, SimCLR 0.35, VICReg 0.20 ({SEQ_JEPA_LOW})",
                 ours,
                 verdict_with_details({f"vs {k}": above(sie, v) for k, v in others.items()})))
    # the same ordering at other budgets and on other data: (row, its data, SIE and EquiMod runs)
    for row, data, suffix in (
            ("at twice the steps", "toy set, 1,400 steps", "1400steps"),
            ("at four times the steps", "toy set, 2,800 steps", "2800steps"),
            ("on real meshes", "Sweet Home 3D, 32 px, 702 steps", "sh3d32"),
            ("on the real shapes painted by face normal",
             "Sweet Home 3D, --paint axes, 32 px, 702 steps", "sh3d32axes")):
        sie_r2, equimod_r2 = (values(study, f"{m}-{suffix}", R2) for m in ("sie", "equimod"))
        if sie_r2 or equimod_r2:
            rows.append((f"the same, {row} (vs EquiMod)", "", "",
                         f"{data}, R²: SIE {spread(sie_r2)}; EquiMod {spread(equimod_r2)}",
                         ordering(study, f"sie-{suffix}", f"equimod-{suffix}")))
    mrr = "mrr/embedding"
    comparisons, ours = {}, []
    for steps, suffix in (("700", "toy"), ("1,400", "1400steps"), ("2,800", "2800steps")):
        sie_mrr, equimod_mrr = (values(study, f"{m}-{suffix}", mrr) for m in ("sie", "equimod"))
        comparisons[f"{steps} steps"] = above(sie_mrr, equimod_mrr)
        ours.append(f"{steps} steps: SIE {spread(sie_mrr)}, EquiMod {spread(equimod_mrr)}")
    rows.append(("SIE's MRR is above EquiMod's", "SIE Sec. 5 (predictor quality)",
                 f"SIE 0.411, EquiMod 0.154 ({SEQ_JEPA_HIGH}); SIE 0.319, EquiMod 0.136 "
                 "(seq-JEPA Table 10, low compute)",
                 "toy set, MRR: " + "; ".join(ours),
                 # a claim about the end of training: the longest budget decides
                 f"{comparisons['2,800 steps']} at 2,800 steps (" + "; ".join(
                     f"{k}: {v}" for k, v in comparisons.items()) + ")"))
    # The rows below compare parts of one SIE run, or SIE with one change, seed by seed; a run
    # on its plateau has learned nothing to compare, so the verdict is drawn on the seeds where
    # the toy-preset SIE run is off it (marked *), and every seed is listed.
    def compared(config_a, key_a, config_b, key_b, reference="sie-toy"):
        """(' s0 -0.004, s1* 0.025', verdict on the * seeds) for value(a) - value(b); * = the
        seeds where the reference SIE configuration is off its plateau."""
        working = off_plateau_seeds(study, reference)
        a, b = seeds_of(study, config_a, key_a), seeds_of(study, config_b, key_b)
        shown = ", ".join(f"s{s}{'*' if s in working else ''} {a[s] - b[s]:.3f}"
                          for s in a if s in b)
        on_working = per_seed_differences(study, config_a, key_a, config_b, key_b, working)
        if shown and not on_working:
            return shown, "no seed off the plateau yet"
        return shown, paired(on_working)

    shown, verdict = compared("sie-toy", R2_EQUI, "sie-toy", R2_INV)
    rows.append(("the equivariant part's rotation R² is above the invariant part's",
                 "SIE Sec. 5, Table 1", "",
                 f"{TOY}, R² equi {spread(values(study, 'sie-toy', R2_EQUI))}, inv "
                 f"{spread(values(study, 'sie-toy', R2_INV))}; equi − inv: {shown}", verdict))
    shown, verdict = compared("sie-2800steps", R2_EQUI, "sie-2800steps", R2_INV,
                              reference="sie-2800steps")
    rows.append(("the same, at four times the steps", "", "",
                 f"toy set, 2,800 steps, R² equi "
                 f"{spread(values(study, 'sie-2800steps', R2_EQUI))}, inv "
                 f"{spread(values(study, 'sie-2800steps', R2_INV))}; equi − inv: {shown}",
                 verdict))
    shown, verdict = compared("sie-toy", "top1/inv", "sie-toy", "top1/equi")
    rows.append(("the invariant part's top-1 is above the equivariant part's",
                 "SIE Sec. 5, Table 1", "",
                 f"{TOY}, top-1 inv {spread(values(study, 'sie-toy', 'top1/inv'))}, equi "
                 f"{spread(values(study, 'sie-toy', 'top1/equi'))}; inv − equi: {shown}",
                 verdict))
    for name, budget in (("sie-toy", TOY), ("sie-2800steps", "toy set, 2,800 steps")):
        runs = list(runs_of(study, name).values())
        mrr_chance = chance(runs[0], mrr) if runs else 0.09
        pre_chance = chance(runs[0], "pre/embedding") if runs else 0.62
        margins = [min(value(r, mrr) - 2 * mrr_chance, pre_chance - value(r, "pre/embedding"))
                   for r in runs]
        claim = (f"SIE's MRR is far above chance ({mrr_chance:.3f}) and its PRE below chance "
                 f"({pre_chance:.3f}); read as MRR > 2 × chance, every seed")
        rows.append((claim if name == "sie-toy" else "the same, at four times the steps",
                     "SIE Sec. 5 (predictor quality)" if name == "sie-toy" else "",
                     f"SIE MRR 0.411, H@1 0.287; EquiMod MRR 0.154 ({SEQ_JEPA_HIGH}); PRE: not "
                     "reported by any later paper" if name == "sie-toy" else "",
                     f"{budget}: MRR {fmt(values(study, name, mrr))}, PRE "
                     f"{fmt(values(study, name, 'pre/embedding'))}",
                     paired(margins)))
    shown, verdict = compared("sie-toy", mrr, "sie-nopredvar", mrr)
    rows.append(("dropping the predictor-variance term lowers MRR",
                 "SIE Sec. 5, ablation table", "",
                 f"{TOY}, MRR: SIE {spread(values(study, 'sie-toy', mrr))}, no pred-var "
                 f"{spread(values(study, 'sie-nopredvar', mrr))}; SIE − no pred-var: {shown}",
                 verdict))
    shown_r2, verdict_r2 = compared("sie-toy", R2_EQUI, "sie-mlppred", R2_EQUI)
    shown_mrr, verdict_mrr = compared("sie-toy", mrr, "sie-mlppred", mrr)
    rows.append(("the hypernetwork predictor keeps the equivariant part equivariant where an MLP "
                 "predictor on [g; z] drifts to invariance (lower equi R² and MRR)",
                 "SIE Sec. 3-4", "",
                 f"{TOY}: equi R² hypernet − MLP: {shown_r2}; MRR hypernet − MLP: {shown_mrr}",
                 verdict_with_details({"R²": verdict_r2, "MRR": verdict_mrr})))
    colour = "color_r2_pooled/full"
    shown_colour, verdict_colour = compared("sie-rotcolor", colour, "sie-toy", colour)
    shown_top1, verdict_top1 = compared("sie-toy", "top1/full", "sie-rotcolor", "top1/full")
    rows.append(("conditioning on rotation + colour raises colour R² and costs top-1",
                 "SIE Sec. 5", "SIE rot+colour: colour R² 0.97, top-1 75.34 vs 77.49 "
                 "(seq-JEPA Tables 7 and 1)",
                 f"{TOY}: colour R² rot+colour − rot: {shown_colour}; top-1 rot − rot+colour: "
                 f"{shown_top1}",
                 verdict_with_details({"colour R²": verdict_colour, "top-1": verdict_top1})))
    per_output = "rot_r2_per_output/full"
    ood = {label: values(study, f"{name}-toy-ood", per_output)
           for label, name in {"SIE": "sie", **baselines}.items()}
    in_distribution = {label: values(study, f"{name}-toy", per_output)
                       for label, name in {"SIE": "sie", **baselines}.items()}
    rows.append(("every method's rotation R² collapses on the OOD angles (beyond ±π/2): read "
                 f"as per-output R² below {COLLAPSED} (the mean predictor scores 0)",
                 "seq-JEPA Table 9",
                 "every method's R² negative (−0.25 to −0.71), SIE −0.63",
                 "toy OOD set (the same objects), probes fit and tested on it, per-output R²: "
                 + "; ".join(f"{k} {spread(v)}" for k, v in ood.items())
                 + " (in distribution: " + "; ".join(
                     f"{k} {spread(v)}" for k, v in in_distribution.items()) + ")",
                 verdict_with_details({k: paired([COLLAPSED - x for x in v])
                                       for k, v in ood.items()})))
    return rows


def ser_claims(study, ser):
    """The SER paper's claims as rows (results/ser-toy: the L sweep; study: the robustness and
    3DIEBench runs)."""
    rows = []
    names = {2: "ser-toy-moco", 4: "ser-toy-moco-L4", 6: "ser-toy-moco-L6"}
    comparisons, ours = {}, []
    for block, name in names.items():
        reg = delta_eq_values(ser, name, block)
        lam0 = delta_eq_values(ser, "ser-toy-moco-lam0", block)
        vanilla = delta_eq_values(ser, "ser-toy-moco-vanilla", block)
        comparisons[f"L={block} vs λ=0"] = above(reg, lam0)
        comparisons[f"L={block} vs vanilla"] = above(reg, vanilla)
        ours.append(f"block {block}: λ=1 {spread(reg)}, λ=0 {spread(lam0)}, vanilla "
                    f"{spread(vanilla)}")
    rows.append(("the regularised block's equivariance rises with λ > 0 over λ = 0 and vanilla",
                 "SER Table 4", "rotation equivariance 0.840 (L = 3) vs 0.804 (MoCo-v3)",
                 "toy ImageFolder, 150 steps, Δeq: " + "; ".join(ours),
                 verdict_with_details(comparisons)))
    last = {block: delta_eq_values(ser, name, 6) for block, name in names.items()}
    rows.append(("the last block's equivariance rises with the regularised layer's depth",
                 "SER Table 4", "0.840 / 0.888 / 0.924 for L = 3 / 9 / 12",
                 "Δeq at block 6: " + ", ".join(f"L={b} {spread(v)}" for b, v in last.items()),
                 verdict_with_details({"L=4 vs L=2": above(last[4], last[2]),
                                       "L=6 vs L=4": above(last[6], last[4])})))
    configs = {"SER": "ser-moco-L2", "λ=0": "ser-moco-lam0", "vanilla": "ser-moco-vanilla"}
    for metric, label, theirs in (
            ("linear_top1/full", "linear-probe top-1", "69.28 / 68.82 / 68.44 (one seed)"),
            ("robust_top1_*/full", "robustness top-1 (mean over eval.py's shifts)",
             "ImageNet-C +1.11, ImageNet-P +1.22 over MoCo-v3")):
        got = {k: values(study, v, metric) for k, v in configs.items()}
        rows.append((f"{label}: SER above λ = 0 above vanilla", "SER Tables 1, 4", theirs,
                     "toy ImageFolder, 150 steps: " + "; ".join(
                         f"{k} {spread(v)}" for k, v in got.items()),
                     verdict_with_details({"SER vs λ=0": above(got["SER"], got["λ=0"]),
                                           "λ=0 vs vanilla": above(got["λ=0"], got["vanilla"])})))
    for base, gain in (("dino", "+0.26"), ("bt", "+0.68")):
        vanilla = values(study, f"ser-{base}-vanilla", "linear_top1/full")
        regularised = values(study, f"ser-{base}-L2", "linear_top1/full")
        label = {"dino": "DINO", "bt": "Barlow Twins"}[base]
        rows.append((f"SER raises {label}'s linear-probe top-1", "SER Sec. 5",
                     f"{gain} pt (ViT-S/16, ImageNet)",
                     f"toy ImageFolder, 150 steps: vanilla {spread(vanilla)}; SER "
                     f"{spread(regularised)}", above(regularised, vanilla)))
    got = {k: values(study, f"{v}-3diebench", R2) for k, v in configs.items()}
    top1 = {k: values(study, f"{v}-3diebench", "top1/full") for k, v in configs.items()}
    rows.append(("on 3DIEBench (out of distribution), SER's ViT predicts rotation better than "
                 "vanilla's", "SER Sec. 5 (3DIEBench)", "not retrieved",
                 "ImageFolder-trained ViTs probed on the toy 3DIEBench set, R²: " + "; ".join(
                     f"{k} {spread(v)}" for k, v in got.items()) + "; top-1: " + "; ".join(
                     f"{k} {spread(v)}" for k, v in top1.items()),
                 verdict_with_details({"vs vanilla": above(got["SER"], got["vanilla"]),
                                       "vs λ=0": above(got["SER"], got["λ=0"])})))
    return rows


# SER against the add-ons it is compared with (quick_study.sh's addons-* runs, MoCo-v3 base, all
# with the same ser.py): (label, configuration, views, the vanilla run with the same invariance
# views). E-SSL's 4 rotated crops reach only its rotation head, so its vanilla is the 2-view one.
ADDONS = [("vanilla", "addons-vanilla", "2", None), ("SER", "addons-ser", "2", "vanilla"),
          ("AugSelf", "addons-augself", "2", "vanilla"),
          ("AugSelf, decoupled", "addons-augself-L2", "2", "vanilla"),
          ("EquiMod", "addons-equimod", "3", "vanilla"),
          ("EquiMod, decoupled", "addons-equimod-L2", "3", "vanilla"),
          ("E-SSL", "addons-essl", "2+4", "vanilla"), ("SER 2+4", "addons-ser-local4", "2+4",
                                                       "vanilla 2+4"),
          ("vanilla 2+4", "addons-vanilla-local4", "2+4", None)]
LINEAR = "linear_top1/full"


def with_seeds(folder, configuration_name, key):
    """'0.183 ± 0.010 (3: 0.175, 0.180, 0.195)': spread() and each seed's value, by seed."""
    found = seeds_of(folder, configuration_name, key)
    if not found:
        return "not run"
    return spread(found.values())[:-1] + ": " + fmt(found.values()) + ")"


def regularised_block(folder, configuration_name):
    """The block an objective reads (ser.py's --ser-layer as the run resolved it, from the config
    line of its log.jsonl), or None for a run without one (--ser off, or not run)."""
    for path in sorted(glob.glob(os.path.join(folder, f"{configuration_name}-s*", "log.jsonl"))):
        config = read_jsonl(path)[0].get("config")
        if not isinstance(config, dict) or not isinstance(config.get("ser_layer"), int):
            raise BadInput(f"{path}: its first line is not ser.py's config line (ser_layer)")
        return config["ser_layer"] if config.get("ser") == "on" else None
    return None


def seed_differences(folder, config_a, config_b, key):
    """'s0 0.010, s1 -0.005' for value(a) - value(b) on the seeds both have, and the list."""
    a, b = seeds_of(folder, config_a, key), seeds_of(folder, config_b, key)
    differences = {s: a[s] - b[s] for s in a if s in b}
    return ", ".join(f"s{s} {d:.3f}" for s, d in differences.items()), list(differences.values())


def addon_claims(study):
    """SER vs the add-ons at matched views, layer decoupling of the add-ons, and the equivariance
    of each objective's block, on the addons-* runs."""
    runs = {label: name for label, name, _, _ in ADDONS}
    top1 = {label: values(study, name, LINEAR) for label, name, _, _ in ADDONS}
    data = "toy ImageFolder, 150 steps, linear top-1"
    rows = []
    for views, addon, references, claim, theirs in (
            ("2", "AugSelf", ["vanilla"], "linear-probe top-1 at matched views: SER above "
             "AugSelf (2 views)", "SER 69.28, AugSelf 67.55 (MoCo-v3 68.44)"),
            ("3", "EquiMod", ["vanilla"], "the same, 3 views: SER (2 views) above EquiMod",
             "SER 69.28, EquiMod 68.95"),
            ("2+4", "E-SSL", ["vanilla", "vanilla 2+4"], "the same, 2+4 views: SER 2+4 above "
             "E-SSL", "SER 71.56, E-SSL 70.60")):
        ser = "SER 2+4" if views == "2+4" else "SER"
        ours = "; ".join(f"{label} {with_seeds(study, runs[label], LINEAR)}"
                         for label in [ser, addon] + references)
        rows.append((claim, "SER Table 1" if views == "2" else "", theirs, f"{data}: {ours}",
                     above(top1[ser], top1[addon])))
    for addon, theirs in (("EquiMod", "68.95 → 69.51"), ("AugSelf", "67.55 → 68.23")):
        decoupled = f"{addon}, decoupled"
        shown, differences = seed_differences(study, runs[decoupled], runs[addon], LINEAR)
        rows.append((f"layer decoupling raises {addon}'s linear-probe top-1 (its objective at "
                     "block 2 of 6 instead of the last)",
                     "SER Sec. 5 (layer-decoupled baselines)" if addon == "EquiMod" else "",
                     f"{theirs} (layer 12 → layer 3 of 12)",
                     f"{data}: last block {with_seeds(study, runs[addon], LINEAR)}; block 2 "
                     f"{with_seeds(study, runs[decoupled], LINEAR)}; block 2 − last: "
                     f"{shown or 'not run'}", paired(differences)))
    comparisons, groups = {}, {}          # groups: (vanilla, block) -> ["label Δeq", ...]
    for label, name, _, reference in ADDONS:
        block = regularised_block(study, name)
        if reference is None or block is None:
            if reference is not None:
                comparisons[label] = "not run"
            continue
        mine = delta_eq_values(study, name, block)
        vanilla = delta_eq_values(study, runs[reference], block)
        comparisons[label] = above(mine, vanilla)
        group = groups.setdefault((reference, block), [f"{reference} {spread(vanilla)}"])
        group.append(f"{label} {spread(mine)}")
    ours = [f"{'block' if reference == 'vanilla' else '2+4 views, block'} {block}: "
            + ", ".join(group) for (reference, block), group in groups.items()]
    rows.append(("each objective raises the equivariance score of the block it regularises "
                 "over vanilla's same block", "SER Table 4",
                 "rotation equivariance: SER 0.840 (L = 3), MoCo-v3 0.804; the add-ons': not "
                 "reported", "toy ImageFolder, 150 steps, Δeq: " + "; ".join(ours),
                 verdict_with_details(comparisons)))
    return rows


def addons_table(study):
    """Per addons-* configuration: its views and block, linear top-1, 20-NN top-1, robustness
    top-1 and Δeq at blocks 2 and 6, each as mean ± std with every seed; training time."""
    print("| configuration | views | objective's block | linear top-1 | 20-NN top-1 | robustness "
          "top-1 (mean over shifts) | Δeq block 2 | Δeq block 6 | training (min per run) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, name, views, _ in ADDONS:
        results = runs_of(study, name)
        if not results:
            continue
        block = regularised_block(study, name)
        logs = sorted(glob.glob(os.path.join(study, f"{name}-s*", "log.jsonl")))
        minutes = mean([training_seconds(path) for path in logs]) / 60
        deltas = [f"{spread(delta_eq(r, b) for r in results.values())[:-1]}: "
                  f"{fmt(delta_eq(r, b) for r in results.values())})" for b in (2, 6)]
        cells = [f"{label} ({name})", views, str(block) if block else "none",
                 with_seeds(study, name, LINEAR), with_seeds(study, name, "knn20_top1/full"),
                 with_seeds(study, name, "robust_top1_*/full"), *deltas, f"{minutes:.1f}"]
        print("| " + " | ".join(cells) + " |")


# Question 1: one factor at a time from the toy preset. (label, SIE run, EquiMod run)
FACTORS = [
    ("toy preset (700 steps, batch 32, 32 px, 20 objects per class, widths 64, α 0.45)",
     "sie-toy", "equimod-toy"),
    ("steps × 2 (1,400)", "sie-1400steps", "equimod-1400steps"),
    ("steps × 4 (2,800)", "sie-2800steps", "equimod-2800steps"),
    ("batch × 2 (64), 700 steps", "sie-batch64", "equimod-batch64"),
    ("objects per class × 5 (100)", "sie-1k", "equimod-1k"),
    ("projector widths 16 (a quarter; width / batch 0.5)", "sie-mlp16", "equimod-mlp16"),
    ("resolution 48 px (the toy set rendered at 48 px)", "sie-48px", "equimod-48px"),
    ("palette paint (two colours per object) instead of axis paint", "sie-palette",
     "equimod-palette"),
    ("real meshes (Sweet Home 3D, 32 px, 702 steps)", "sie-sh3d32", "equimod-sh3d32"),
    ("real meshes, steps × 4 (2,808)", None, "equimod-sh3d32-2808steps"),
    ("real shapes painted by face normal (Sweet Home 3D, --paint axes)", "sie-sh3d32axes",
     "equimod-sh3d32axes"),
    ("α = 2 (equivariance weight × 4.4)", "sie-alpha2", None),
    ("λ_std = 25 (variance weight × 2.5)", "sie-std25", None),
    ("λ_cov = 0.1 (covariance weight / 10)", "sie-cov0.1", None),
    ("predictor init: H from N(0, G²/d), G = 1, so ‖W(g)z‖ ≈ ‖z‖ at the start (the default "
     "U(−½, ½) gives 1.6 ‖z‖)", "sie-gain1", None),
    ("predictor init G = 1.6 (the default's gain, from a normal)", "sie-gain1.6", None),
    ("predictor init G = 0.5", "sie-gain0.5", None),
    ("predictor init G = 0 (W(g) = 0 at the start)", "sie-gain0", None),
    ("predictor init G = 1, steps × 2 (1,400)", "sie-gain1-1400steps", "equimod-1400steps"),
    ("predictor init G = 1, steps × 4 (2,800)", "sie-gain1-2800steps", "equimod-2800steps"),
    ("predictor init G = 0, steps × 2 (1,400)", "sie-gain0-1400steps", "equimod-1400steps"),
    ("predictor init G = 0, steps × 4 (2,800)", "sie-gain0-2800steps", "equimod-2800steps"),
    ("predictor: MLP on [g; z] instead of the hypernetwork", "sie-mlppred", None),
    ("no predictor-variance term", "sie-nopredvar", None),
]


ONSET_R2 = 0.35     # the online monitor's rotation R² (training pairs; constant level about 0.22)


def onset(log_path, window=5):
    """The first step at which the online monitor's rotation R² (equivariant part for SIE),
    averaged over `window` consecutive monitor lines, reaches ONSET_R2; '>N' if it never does."""
    online = [e for e in read_jsonl(log_path) if e["kind"] == "online"]
    r2 = [e.get("rot_r2_equi", e.get("rot_r2_full")) for e in online]
    for i in range(window, len(online) + 1):
        if mean(r2[i - window:i]) >= ONSET_R2:
            return str(online[i - 1]["step"])
    return f">{online[-1]['step']}" if online else "?"


def onsets(study, configuration_name):
    paths = sorted(glob.glob(os.path.join(study, f"{configuration_name}-s*", "log.jsonl")))
    return ", ".join(onset(path) for path in paths)


def question1_table(study):
    print("| setting | SIE R² per seed | SIE MRR per seed | SIE seeds off the plateau | "
          "SIE onset step | EquiMod R² per seed | EquiMod MRR per seed | EquiMod onset step | "
          "SIE above EquiMod (R²) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, sie, equimod in FACTORS:
        sie_runs = runs_of(study, sie) if sie else {}
        equimod_r2 = values(study, equimod, R2) if equimod else []
        if (sie and not sie_runs) or (not sie and not equimod_r2):    # not run (yet)
            continue
        off = sum(learned(r) for r in sie_runs.values())
        cells = [label, fmt(values(study, sie, R2)) if sie else "not run",
                 fmt(values(study, sie, "mrr/embedding")) if sie else "",
                 f"{off} of {len(sie_runs)}" if sie else "", onsets(study, sie) if sie else "",
                 fmt(equimod_r2) if equimod else "(same as the toy preset)",
                 fmt(values(study, equimod, "mrr/embedding")) if equimod else "",
                 onsets(study, equimod) if equimod else "",
                 ordering(study, sie, equimod) if sie and equimod else ""]
        print("| " + " | ".join(cells) + " |")


def question2_table(study):
    """Rotation R² of each part, on the representation and on the projector outputs."""
    print("| run | seed | off the plateau | R² inv (representation) | R² equi (representation) | "
          "R² z_inv (projector output) | R² z_equi (projector output) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("sie-toy", "sie-1400steps", "sie-2800steps", "sie-batch64", "sie-1k",
                 "sie-mlppred", "sie-gain1", "sie-gain1-2800steps"):
        z_runs = runs_of(study, f"{name}-z")
        for seed, result in runs_of(study, name).items():
            z = z_runs.get(seed)
            cells = [name, str(seed), "yes" if learned(result) else "no",
                     f"{value(result, R2_INV):.3f}", f"{value(result, R2_EQUI):.3f}",
                     f"{value(z, 'rot_r2_pooled/z_inv'):.3f}" if z else "",
                     f"{value(z, 'rot_r2_pooled/z_equi'):.3f}" if z else ""]
            print("| " + " | ".join(cells) + " |")


def drift_table(study):
    """Per drift run (results/predictor_drift.py): after each piece, how far H has moved from its
    initialisation relative to the initialisation's size, with the online rotation R²."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(study, "*-drift-s*", "drift.jsonl"))):
        rows = read_jsonl(path, kind_required=False)
        for number, row in enumerate(rows, 1):
            if not all(isinstance(row.get(k), (int, float))
                       for k in ("step", "rms_h0", "rms_drift", "online_r2")):
                raise BadInput(f"{path}, line {number}: step, rms_h0, rms_drift and online_r2 "
                               "must be numbers (written by results/predictor_drift.py)")
        runs[os.path.basename(os.path.dirname(path))] = rows
    if not runs:
        return
    steps = [row["step"] for row in max(runs.values(), key=len)]
    print("| run | RMS of H0 | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---" * (len(steps) + 2) + "|")
    for name, rows in runs.items():
        cells = [f"{row['rms_drift'] / row['rms_h0']:.2f} ({row['online_r2']:.2f})"
                 if row["rms_h0"] else f"H0 = 0 ({row['online_r2']:.2f})" for row in rows]
        print(f"| {name} | {rows[0]['rms_h0']:.3f} | " + " | ".join(cells) + " |")


def claims_table(study, ser):
    print("| claim | source | theirs (real data) | ours | verdict |")
    print("|---|---|---|---|---|")
    for row in sie_claims(study) + ser_claims(study, ser) + addon_claims(study):
        print("| " + " | ".join(row) + " |")


def training_seconds(log_path):
    """A run's training time from its log: each train line's steps × batch / logged throughput
    (evaluation not included)."""
    log = read_jsonl(log_path)
    config = log[0].get("config") if log and log[0]["kind"] == "config" else None
    if not isinstance(config, dict) or not isinstance(config.get("batch_size"), int):
        raise BadInput(f"{log_path}: its first line is not the run's config line")
    batch = config["batch_size"]
    seconds, last_step = 0.0, 0
    for e in log:
        if e["kind"] != "train":
            continue
        # batch rows per second: pairs_per_s (sie.py, baselines.py), images_per_s (ser.py;
        # img_per_s in the older logs of results/ser-toy)
        rate = next((v for k, v in e.items() if k.endswith("_per_s")), None)
        if rate:
            seconds += (e["step"] - last_step) * batch / rate
            last_step = e["step"]
    return seconds


def time_table(study, ser):
    print("| result folder | runs | training time, one thread each (h) |")
    print("|---|---|---|")
    for folder in (study, ser):
        logs = sorted(glob.glob(os.path.join(folder, "*", "log.jsonl")))
        hours = sum(training_seconds(path) for path in logs) / 3600
        print(f"| {folder} | {len(logs)} | {hours:.1f} |")


def default_table(folder):
    """The README's first screen: the default command `python sie.py` with seeds 0-3 at 2 and 1
    threads (results/default_runs.sh), per run and as mean ± std per thread count, with the rule
    the toy preset must meet: MRR above 2x chance and the equivariant part's rotation R² above
    0.5, in every run."""
    runs = {}                                   # threads -> [(seed, mrr, r2, passed)]
    for path in sorted(glob.glob(os.path.join(folder, "t*-s*", "eval.json"))):
        threads, seed = re.fullmatch(r"t(\d+)-s(\d+)",
                                     os.path.basename(os.path.dirname(path))).groups()
        result = read_eval(path)
        mrr, r2 = value(result, "mrr/embedding"), value(result, "rot_r2_pooled/equi")
        passed = mrr > 2 * chance(result, "mrr/embedding") and r2 > 0.5
        runs.setdefault(int(threads), []).append((seed, mrr, r2, passed))
    if not runs:
        raise BadInput(f"--default {folder}: no t<threads>-s<seed>/eval.json")
    print(f"| threads | seed | MRR (chance {chance(result, 'mrr/embedding'):.3f}) | rotation R², "
          f"equivariant part (constant {chance(result, 'rot_r2_pooled/equi'):.3f}) | "
          f"MRR > 2x chance and R² > 0.5 |")
    print("|---|---|---|---|---|")
    for threads in sorted(runs, reverse=True):
        for seed, mrr, r2, passed in runs[threads]:
            print(f"| {threads} | {seed} | {mrr:.3f} | {r2:.3f} | {'yes' if passed else 'NO'} |")
        rows = runs[threads]
        print(f"| {threads} | mean ± std | {spread(r[1] for r in rows)} | "
              f"{spread(r[2] for r in rows)} | {sum(r[3] for r in rows)} of {len(rows)} |")


TABLES = ("claims", "question1", "question2", "losses", "drift", "time", "default", "addons")
TABLE_START = "<!-- table: python results/make_figures.py --table {} -->"
TABLE_END = "<!-- end of table -->"


def print_table(name, study, ser, default="results/default"):
    if name == "claims":
        claims_table(study, ser)
    elif name == "question1":
        question1_table(study)
    elif name == "question2":
        question2_table(study)
    elif name == "drift":
        drift_table(study)
    elif name == "time":
        time_table(study, ser)
    elif name == "default":
        default_table(default)
    elif name == "addons":
        addons_table(study)
    else:
        loss_table(os.path.join(study, "sie-*"))


def update_readme(readme, study, ser, default):
    """Replace each marked table of the README by the one generated now. Every table is made
    before the file is touched, and the file is replaced in one rename: a failure leaves it as
    it was."""
    try:
        with open(readme) as f:
            text = f.read()
    except OSError as e:
        raise BadInput(f"--readme {readme}: cannot read it ({e.strerror})") from None
    found = 0
    for name in TABLES:
        start = TABLE_START.format(name)
        if start not in text:
            continue
        before, rest = text.split(start, 1)
        if TABLE_END not in rest:
            raise BadInput(f"{readme}: '{start}' has no '{TABLE_END}' line after it")
        _, after = rest.split(TABLE_END, 1)
        table = io.StringIO()
        with contextlib.redirect_stdout(table):
            print_table(name, study, ser, default)
        text = before + start + "\n" + table.getvalue() + TABLE_END + after
        found += 1
    if not found:
        raise BadInput(f"{readme}: no '{TABLE_START.format('NAME')}' line: no table to rewrite")
    handle, partial = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(readme)),
                                       prefix=".make_figures-")
    with os.fdopen(handle, "w") as f:
        f.write(text)
    shutil.copymode(readme, partial)
    os.replace(partial, readme)


def check_results(folder, flag):
    """A result folder must exist and hold runs: a typo must not turn every table into 'not
    run'."""
    if not os.path.isdir(folder):
        raise BadInput(f"{flag} {folder}: no such folder")
    if not any(glob.glob(os.path.join(folder, "*", name))
               for name in ("eval.json", "log.jsonl", "drift.jsonl")):
        raise BadInput(f"{flag} {folder}: holds no runs (no <run>/eval.json, log.jsonl or "
                       "drift.jsonl)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="results/study", help="the quick study's result folder")
    p.add_argument("--ser", default="results/ser-toy", help="the SER sweep's result folder")
    p.add_argument("--default", default="results/default",
                   help="the default command's runs (results/default_runs.sh)")
    p.add_argument("--curves-run", default="sie-toy-s1", help="the SIE run whose curves are drawn")
    p.add_argument("--out", default="assets", help="where the PNG files go")
    p.add_argument("--table", choices=TABLES,
                   help="print one of the README's study tables instead of drawing the figures")
    p.add_argument("--readme", help="rewrite every table of this README between its '<!-- table: "
                                    "... --table NAME -->' and '<!-- end of table -->' lines")
    args = p.parse_args(argv)
    try:
        draw(args)
    except BadInput as e:
        p.exit(2, f"make_figures.py: error: {e}\n")
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        p.exit(2, f"make_figures.py: error: a result file under {args.study} or {args.ser} "
                  f"lacks what the tables need ({type(e).__name__}: {e})\n")


def draw(args):
    check_results(args.study, "--study")
    if not args.table or args.table in ("claims", "time"):          # the tables that read --ser
        check_results(args.ser, "--ser")
    if args.readme:
        update_readme(args.readme, args.study, args.ser, args.default)
        return
    if args.table:
        print_table(args.table, args.study, args.ser, args.default)
        return
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise BadInput(f"--out {args.out}: a file, not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out {args.out}: cannot create it ({e.strerror})") from None
    log = os.path.join(args.study, args.curves_run, "log.jsonl")
    if os.path.isfile(log):
        sie_curves(log, os.path.join(args.out, "study_sie_curves.png"))
    onset_curves(args.study, os.path.join(args.out, "study_onset.png"))
    onset_curves(args.study, os.path.join(args.out, "study_predictor_gain.png"),
                 configurations=("sie-toy", "sie-gain1.6", "sie-gain1", "sie-gain0.5", "sie-gain0"))
    if glob.glob(os.path.join(args.study, "*", "eval.json")):
        method_bars(os.path.join(args.study, "*"), os.path.join(args.out, "study_methods.png"))
    if glob.glob(os.path.join(args.ser, "*", "eval.json")):
        ser_equivariance(os.path.join(args.ser, "*"),
                         os.path.join(args.out, "study_ser_equivariance.png"))
    if glob.glob(os.path.join(args.study, "addons-*", "eval.json")):
        ser_equivariance(os.path.join(args.study, "addons-*"),
                         os.path.join(args.out, "study_addons_equivariance.png"),
                         "SER and the add-ons (MoCo-v3): delta-equivariance per block, mean over "
                         "seeds", legend_right=True)


if __name__ == "__main__":
    main()
