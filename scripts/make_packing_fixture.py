"""Writes tests/fixtures/packing_bfd.json: how TRL's SFTTrainer packs examples (`pack_dataset`, strategy
"bfd", the default: best fit decreasing within each batch of 1,000 rows that `datasets.map` hands it),
as the original example indices in each packed sequence, for random example lengths. 2,500 examples, so
that the batch boundaries show. And tests/fixtures/packing_strategies.json: for each strategy (bfd,
bfd_split, wrapped), the rows SFTTrainer trains on from 1,100 examples longer and shorter than the
sequence length, some of their first tokens without labels: each row's ids, its examples' lengths
(seq_lengths; none for wrapped) and its labels as SFTTrainer's collator leaves them (padding-free rows,
bfd's, label no sequence start).

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

# Token j of example i is i * 1000 + j; the first m_i tokens of example i carry no label (a prompt).
rng = random.Random(5)
lengths = [rng.choice([rng.randint(1, 12), rng.randint(10, 40), rng.randint(30, 150)]) for _ in range(1100)]
ids = [[i * 1000 + j for j in range(n)] for i, n in enumerate(lengths)]
labels = []
for i, n in enumerate(lengths):
    m = rng.choice([0, 0, rng.randint(0, n)])
    labels.append([-100] * m + ids[i][m:])
dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
strategies = {}
for strategy in ["bfd", "bfd_split", "wrapped"]:
    rows = []
    for row in pack_dataset(dataset, SEQ_LENGTH, strategy):
        seq_lengths = row.get("seq_lengths")
        row_labels = list(row["labels"])
        if seq_lengths is not None:
            # The collator's padding-free rows: no label at a sequence start.
            start = 0
            for n in seq_lengths:
                row_labels[start] = -100
                start += n
        # Compactly: the row's tokens as runs [example, first token, count], its labels as 0s and 1s.
        runs = []
        for token in row["input_ids"]:
            i, j = divmod(token, 1000)
            if runs and runs[-1][0] == i and runs[-1][1] + runs[-1][2] == j:
                runs[-1][2] += 1
            else:
                runs.append([i, j, 1])
        rows.append({"runs": runs, "seq_lengths": seq_lengths,
                     "labelled": "".join("0" if label == -100 else "1" for label in row_labels)})
    strategies[strategy] = rows
prompts = [next((j for j, label in enumerate(row) if label != -100), len(row)) for row in labels]
with open("tests/fixtures/packing_strategies.json", "w") as f:
    json.dump({"trl": trl.__version__, "seq_length": SEQ_LENGTH, "lengths": lengths, "prompts": prompts,
               "strategies": strategies}, f)
print({k: len(v) for k, v in strategies.items()}, "rows")
