"""Generate the demo's synthetic classification dataset: support tickets routed to a team.

Deterministic (seeded): running it again writes the same files. The held-out test set uses the
same vocabulary in combinations the training set never contains.

    python configs/examples/make_dataset.py [--out configs/examples/data] [--per-class 60]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

SEPARATOR = "\n\n###\n\nTeam:"

# Each class: (subjects, problems). A ticket is an opener, a subject and a problem.
CLASSES: dict[str, tuple[list[str], list[str]]] = {
    "Billing": (
        ["my invoice", "the refund", "my credit card", "the monthly charge", "my payment", "the receipt"],
        ["was charged twice", "shows the wrong amount", "has not arrived", "was declined", "looks too high",
         "needs a correction"],
    ),
    "Shipping": (
        ["my parcel", "the delivery", "the courier", "my package", "the tracking number", "the shipment"],
        ["is three days late", "went to the wrong address", "never showed up", "arrived damaged",
         "is stuck in transit", "was left outside"],
    ),
    "Technical": (
        ["the mobile app", "the website", "the login page", "the export button", "the dashboard", "the sync feature"],
        ["crashes on start", "shows an error code", "will not load", "freezes after an update", "is very slow",
         "gives a blank screen"],
    ),
    "Account": (
        ["my password", "my username", "my email address", "my profile", "two factor login", "my subscription plan"],
        ["needs to be reset", "must be changed", "was locked", "should be deleted", "cannot be updated",
         "needs a second user"],
    ),
}
OPENERS = ["Hello,", "Hi team,", "Urgent:", "Please help,", "Good morning,", "Quick question:"]


def make_examples(per_class: int, test_per_class: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    train, test = [], []
    for label, (subjects, problems) in CLASSES.items():
        combos = list(itertools.product(subjects, problems))
        rng.shuffle(combos)
        held_out = combos[:test_per_class]  # (subject, problem) pairs never seen in training
        seen = combos[test_per_class:]
        # every training ticket distinct: (opener, subject, problem) drawn without replacement
        tickets = [(o, s, p) for o in OPENERS for s, p in seen]
        for opener, subject, problem in rng.sample(tickets, per_class):
            train.append(_example(opener, subject, problem, label))
        for subject, problem in held_out:
            test.append(_example(rng.choice(OPENERS), subject, problem, label))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def _example(opener: str, subject: str, problem: str, label: str) -> dict:
    prompt = f"{opener} {subject} {problem}.{SEPARATOR}"
    return {"prompt": prompt, "completion": f" {label}<|endoftext|>"}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    ap.add_argument("--per-class", type=int, default=60)
    ap.add_argument("--test-per-class", type=int, default=8)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    train, test = make_examples(args.per_class, args.test_per_class, args.seed)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    print(f"wrote {len(train)} training and {len(test)} held-out examples to {out}")


if __name__ == "__main__":
    main()
