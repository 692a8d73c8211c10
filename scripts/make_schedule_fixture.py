"""Writes tests/fixtures/lr_schedules.json: the learning rate of every optimizer step under each of
transformers' schedules that nibble's --lr-scheduler names, read off the scheduler transformers' Trainer
builds (`get_scheduler` with `lr_scheduler_kwargs`, as `TrainingArguments` hands them over), with and
without warmup, at the defaults and with each schedule's parameters. `constant` ignores warmup there.

Run from the repository root with a virtualenv holding torch and transformers:
    python scripts/make_schedule_fixture.py
"""
import json

import torch
import transformers
from transformers import get_scheduler

CASES = [
    ("constant", {}), ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}),
    ("cosine", {"num_cycles": 1.5}), ("cosine_with_restarts", {}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}), ("polynomial", {"lr_end": 1e-5, "power": 2.0}), ("inverse_sqrt", {}),
    ("inverse_sqrt", {"timescale": 5}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", {"min_lr": 5e-5, "num_cycles": 0.75}), ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.2}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-5, "warmup_lr_rate": 0.3}),
    ("warmup_stable_decay", {"num_decay_steps": 6}),
    ("warmup_stable_decay", {"num_decay_steps": 5, "num_stable_steps": 4, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", {"num_decay_steps": 8, "warmup_type": "1-sqrt", "decay_type": "linear"}),
]
LR, TOTAL = 3e-4, 23

cases = []
for name, kwargs in CASES:
    for warmup in [0, 4]:
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.AdamW([param], lr=LR)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=TOTAL,
                                  scheduler_specific_kwargs=dict(kwargs))
        lrs = []
        for _ in range(TOTAL):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        cases.append({"schedule": name, "kwargs": kwargs, "warmup": warmup, "lr": LR, "total": TOTAL, "lrs": lrs})

with open("tests/fixtures/lr_schedules.json", "w") as f:
    json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1)
print("wrote", len(cases), "cases")
