"""Bayesian (Optuna TPE) search over learning rate, weight decay and drop rate.

Each trial is an ordinary ``training.train`` run (validation images only, never the test list) that
stops early on validation macro AUROC; the trial's best validation AUROC is the objective. Every trial
(parameters, value, epochs, seconds) is recorded in ``docs/search/<study>.json`` as it finishes, so an
interrupted search keeps what it measured.

Example (a small CPU budget)::

    python -m training.search --study nih14-lite0 --trials 8 -- --arch tf_efficientnet_lite0 --init imagenet \
        --epochs 6 --patience 2

Arguments after ``--`` go to every ``training.train`` run; the best parameters are printed as the
command that trains the final checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import optuna

from training.train import main as train_main

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="name of the study (and of its record file)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, nargs=2, default=(1e-4, 3e-3), metavar=("LOW", "HIGH"))
    p.add_argument("--weight-decay", type=float, nargs=2, default=(1e-5, 1e-1), metavar=("LOW", "HIGH"))
    p.add_argument("--drop-rate", type=float, nargs=2, default=(0.0, 0.5), metavar=("LOW", "HIGH"))
    p.add_argument("--startup-trials", type=int, default=None,
                   help="random trials before TPE takes over (default: a third of --trials, at least 2; Optuna's "
                        "own default of 10 would make a small CPU budget a plain random search)")
    p.add_argument("--record-dir", type=Path, default=Path("docs/search"))
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then arguments for training.train")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train_args = [a for a in args.train_args if a != "--"]
    if any(a in train_args for a in ("--lr", "--weight-decay", "--drop-rate", "--name", "--out")):
        raise SystemExit("--lr, --weight-decay, --drop-rate, --name and --out are set by the search")

    record_path = args.record_dir / f"{args.study}.json"
    startup = args.startup_trials if args.startup_trials is not None else max(2, args.trials // 3)
    record = {"study": args.study, "sampler": f"optuna.samplers.TPESampler(seed={args.seed}, n_startup_trials={startup})",
              "optuna": optuna.__version__, "objective": "best validation macro AUROC (patient-disjoint split of train_val)",
              "train_args": train_args, "space": {"lr": list(args.lr), "weight_decay": list(args.weight_decay),
                                                  "drop_rate": list(args.drop_rate)}, "trials": []}
    scratch = Path(tempfile.mkdtemp(prefix=f"search-{args.study}-"))

    def objective(trial: optuna.Trial) -> float:
        params = {"lr": trial.suggest_float("lr", *args.lr, log=True),
                  "weight_decay": trial.suggest_float("weight_decay", *args.weight_decay, log=True),
                  "drop_rate": trial.suggest_float("drop_rate", *args.drop_rate)}
        t0 = time.time()
        folder = train_main([*train_args, "--name", f"trial{trial.number}", "--out", str(scratch), "--no-eval",
                             "--lr", str(params["lr"]), "--weight-decay", str(params["weight_decay"]),
                             "--drop-rate", str(params["drop_rate"])])
        card = json.loads((folder / "config.json").read_text())
        value = float(card["training"]["val_macro_auroc"])
        record["trials"].append({"number": trial.number, "sampled_by": "random (startup)" if trial.number < startup else "TPE",
                                 "params": params, "val_macro_auroc": value,
                                 "best_epoch": card["training"]["best_epoch"], "epochs_run": card["training"]["epochs_run"],
                                 "seconds": round(time.time() - t0)})
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        return value

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=startup),
                                study_name=args.study)
    study.optimize(objective, n_trials=args.trials)
    shutil.rmtree(scratch, ignore_errors=True)
    best = study.best_trial
    record["best"] = {"number": best.number, "params": best.params, "val_macro_auroc": best.value,
                      "command": "python -m training.train " + shlex.join(
                          [*train_args, "--lr", f"{best.params['lr']:.3g}", "--weight-decay", f"{best.params['weight_decay']:.3g}",
                           "--drop-rate", f"{best.params['drop_rate']:.2f}", "--name", "<name>"])}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    log.info("best trial %d: %s (validation macro AUROC %.3f)\n%s", best.number, best.params, best.value,
             record["best"]["command"])
    return record


if __name__ == "__main__":
    main()
