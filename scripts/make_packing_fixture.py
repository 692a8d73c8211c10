"""Writes tests/fixtures/packing_bfd.json: how TRL's SFTTrainer packs examples (`pack_dataset`, strategy
"bfd", the default: best fit decreasing within each batch of 1,000 rows that `datasets.map` hands it),
as the original example indices in each packed sequence, for random example lengths. 2,500 examples, so
that the batch boundaries show.

Run from the repository root with a virtualenv holding trl and datasets:
    python scripts/make_packing_fixture.py
"""
import json
import random

import trl
from datasets import Dataset
from trl.data_utils import pack_dataset

SEQ_LENGTH = 64
rng = random.Random(20261205)
lengths = [rng.choice([rng.randint(1, 12), rng.randint(10, 40), rng.randint(30, SEQ_LENGTH)]) for _ in range(2500)]
# Each example's tokens are its index, so that a packed sequence tells which examples it holds.
dataset = Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
packed = pack_dataset(dataset, SEQ_LENGTH, "bfd")
bins = []
for row in packed:
    ids, seq_lengths = row["input_ids"], row["seq_lengths"]
    starts = [sum(seq_lengths[:k]) for k in range(len(seq_lengths))]
    bins.append([ids[s] for s in starts])
with open("tests/fixtures/packing_bfd.json", "w") as f:
    json.dump({"trl": trl.__version__, "seq_length": SEQ_LENGTH, "lengths": lengths, "bins": bins}, f)
print(len(bins), "packed sequences")
