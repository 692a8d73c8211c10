"""Writes tests/fixtures/tables/: the same rows as JSONL, as a Parquet file written by the `datasets`
library (`Dataset.to_parquet`, snappy), as a zstd-compressed Parquet file (pyarrow, as polars writes
them), and as a `datasets` folder (`save_to_disk`: Arrow stream files and state.json), for
tests/tables.rs to check that every form gives the same examples.

One table per row shape nibble reads (messages, prompt/completion as text and as messages, text,
ShareGPT, Alpaca); `mixed` puts text rows beside prompt/completion ones, its empty cells null.

Run from the repository root with a virtualenv holding datasets (and pyarrow):
    python scripts/make_table_fixtures.py
"""
import json
import os
import shutil

import datasets
import pyarrow
import pyarrow.parquet as pq

OUT = "tests/fixtures/tables"
shutil.rmtree(OUT, ignore_errors=True)
os.makedirs(OUT)
# One table per row shape (a column holds one type), each with two rows or more; `mixed` holds text rows
# beside prompt/completion ones, so its columns carry nulls.
tables = {
    "messages": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is LoRA?"},
                      {"role": "assistant", "content": "Low-rank adapters on frozen weights."}]},
        {"messages": [{"role": "user", "content": "Capital of France?"},
                      {"role": "assistant", "content": "Paris — of course. 🗼"}]},
    ],
    "mixed": [
        {"prompt": "Two plus two is", "completion": " four.", "text": None},
        {"prompt": None, "completion": None, "text": "A plain document, with \"quotes\" and a tab\there."},
    ],
    "conversational": [
        {"prompt": [{"role": "user", "content": "Name a colour."}],
         "completion": [{"role": "assistant", "content": "Teal."}]},
        {"prompt": [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}],
         "completion": [{"role": "assistant", "content": "Bonjour"}]},
    ],
    "sharegpt": [
        {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]},
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "4"}]},
    ],
    "alpaca": [
        {"instruction": "Translate to English.", "input": "chat", "output": "cat"},
        {"instruction": "Say something kind.", "input": "", "output": "You are doing well."},
    ],
}
for name, rows in tables.items():
    with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
        # The JSONL form leaves out what a table fills with null.
        f.writelines(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n"
                     for r in rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(os.path.join(OUT, f"{name}.parquet"))
    ds.save_to_disk(os.path.join(OUT, f"{name}-dataset"))
    if name == "messages":
        pq.write_table(ds.data.table, os.path.join(OUT, f"{name}-zstd.parquet"), compression="zstd")
# Rows of no shape nibble reads: refused naming the file and row.
datasets.Dataset.from_list([{"question": "Why?", "answer": "Because."}]).to_parquet(
    os.path.join(OUT, "unknown.parquet"))
with open(os.path.join(OUT, "versions.json"), "w") as f:
    json.dump({"datasets": datasets.__version__, "pyarrow": pyarrow.__version__}, f, indent=1)
print("wrote", OUT, sorted(os.listdir(OUT)))
