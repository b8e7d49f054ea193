"""How far SIE's hypernetwork H moves from its initialisation H0 while SIE sits on its plateau and
when it leaves it (question 1 of the README's study). Trains one sie.py run in pieces of --every
epochs (--stop-after-epochs: each piece resumes the last exactly, so the run is the one without
pieces) and after each piece appends one JSON line to <out>/drift.jsonl:

    step, rms_h (RMS of H's entries), rms_h0 (of H0's), rms_drift (of H - H0), online_r2 (the
    online monitor's rotation R² of the equivariant part at that step, from the run's log)

    python results/predictor_drift.py runs/study/sie-toy-drift-s0 results/study/sie-toy-drift-s0 \
        -- --seed 0

Rerunning the command resumes: pieces already in drift.jsonl are skipped. H0 is rebuilt here the
way sie.py builds it (torch.manual_seed(seed), then the model); the first piece checks that: an
Adam step moves an entry by a few lr at most, so max |H - H0| after n steps stays below 3.2 n lr.
"""
import argparse
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import sie  # noqa: E402  (the repository's sie.py, whichever folder this runs from)


def initial_h(sie_args):
    torch.manual_seed(sie_args.seed)
    return sie.build_model(sie_args).predictor.hyper.weight.detach()


def fail(message):
    print(f"predictor_drift.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def rms(tensor):
    return tensor.pow(2).mean().sqrt().item()


def positive_int(text):
    """argparse type of --every: a piece of at least one epoch."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of epochs")
    return number


def pieces_done(path):
    """The epochs drift.jsonl already holds (a rerun skips them)."""
    if not os.path.exists(path):
        return []
    epochs = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                epochs.append(json.loads(line)["epoch"])
            except (ValueError, TypeError, KeyError):
                fail(f"{path}, line {number}: not a complete drift record (torn by a kill?); "
                     "remove that line and rerun to resume")
    return epochs


def online_r2_at(log_path, step):
    for line in open(log_path):
        entry = json.loads(line)
        if entry["kind"] == "online" and entry["step"] == step:
            return entry["rot_r2_equi"]
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="after --: sie.py's flags for the run")
    p.add_argument("run_dir", help="sie.py's --run-dir for this run (checkpoints stay there)")
    p.add_argument("out", help="folder for drift.jsonl and the command (committed)")
    p.add_argument("--every", type=positive_int, default=20,
                   help="epochs per piece, a divisor of sie.py's --epochs (a toy-preset epoch is "
                        "5 steps)")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)      # ours -- sie.py's
    args = p.parse_args(argv[:split])
    sie_flags = argv[split + 1:] + ["--run-dir", args.run_dir]
    run_args = sie.parse_args(sie_flags)
    # every check before the first piece trains
    if args.every > run_args.epochs or run_args.epochs % args.every:
        p.error(f"--every {args.every} does not divide sie.py's --epochs {run_args.epochs}: "
                "the pieces must end where the run ends")
    if run_args.predictor != "hypernet":
        p.error(f"sie.py --predictor {run_args.predictor} has no hypernetwork H to measure")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"{args.out}: a file, not a folder for drift.jsonl")
    out = os.path.join(args.out, "drift.jsonl")
    done = pieces_done(out)
    h0 = initial_h(run_args)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        p.error(f"{args.out}: cannot create it ({e.strerror})")
    for epoch in range(args.every, run_args.epochs + 1, args.every):
        if epoch in done:
            continue
        piece = subprocess.run([sys.executable, os.path.join(REPO, "sie.py"), *sie_flags,
                                "--stop-after-epochs", str(args.every), "--no-eval"])
        if piece.returncode:                 # sie.py has said why (bad data, a locked run dir)
            sys.exit(piece.returncode)
        checkpoint = torch.load(os.path.join(args.run_dir, "checkpoint.pt"), weights_only=True,
                                map_location="cpu")
        if checkpoint["epoch"] != epoch:
            fail(f"{args.run_dir}: the checkpoint is at epoch {checkpoint['epoch']}, expected "
                 f"{epoch}; remove {out} and the run dir to start again")
        h = checkpoint["model"]["predictor.hyper.weight"]
        step = checkpoint["step"]
        # An Adam step moves an entry by lr x m/sqrt(v), rarely more than a few lr: 3.2 lr per
        # step is a generous bound, while a wrong H0 is off by ~0.9 somewhere among H's entries.
        if epoch == args.every and (h - h0).abs().max().item() > 3.2 * step * run_args.lr:
            fail(f"H0 rebuilt here is not the run's initial H (an entry moved more than "
                 f"3.2 x {step} x lr)")
        row = dict(epoch=epoch, step=step, rms_h=rms(h), rms_h0=rms(h0), rms_drift=rms(h - h0),
                   online_r2=online_r2_at(os.path.join(args.run_dir, "log.jsonl"), step))
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
    with open(os.path.join(args.out, "command.txt"), "w") as f:
        f.write("OMP_NUM_THREADS=1 python results/predictor_drift.py " + " ".join(
            [args.run_dir, args.out, "--every", str(args.every), "--", *sie_flags[:-2]]) + "\n")


if __name__ == "__main__":
    main()
