"""Writes tests/fixtures/hub_folders/: dataset folders laid out as Hugging Face Hub dataset repositories
are (what `huggingface-cli download --repo-type dataset NAME --local-dir DIR` leaves), and in
expected.json the rows of each split as `datasets.load_dataset(DIR)` finds them: the sharded
data/{split}-NNNNN-of-NNNNN files the Hub writes, splits named by folders or by file names (with the
keywords datasets knows: training, dev, eval, ...), a README.md whose `configs` names the files, one
file with no split in its name (all train), and the hidden .cache folder the download leaves.

Run from the repository root with a virtualenv holding datasets and pyarrow:
    python scripts/make_hub_folder_fixture.py
"""
import json
import os
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = "tests/fixtures/hub_folders"


def rows(tag, n):
    return [{"text": f"{tag} row {i}"} for i in range(n)]


def jsonl(path, items):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")


def parquet(path, items):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(items), path)


LAYOUTS = {
    "sharded": {
        "data/train-00000-of-00002.parquet": rows("train shard 0", 3),
        "data/train-00001-of-00002.parquet": rows("train shard 1", 2),
        "data/test-00000-of-00001.parquet": rows("test", 2),
        "README.md": "# A dataset card without configs\n",
        ".cache/huggingface/download/data/train-00000-of-00002.parquet.metadata": "not data\n",
    },
    "file_names": {
        "train.jsonl": rows("train", 3),
        "validation.jsonl": rows("validation", 2),
        "test.jsonl": rows("test", 1),
    },
    "keywords": {
        "my_training-set.jsonl": rows("training", 2),
        "dev.jsonl": rows("dev", 1),
        "eval_2.jsonl": rows("eval", 2),
    },
    "folders": {
        "train/a.jsonl": rows("train a", 2),
        "train/b.jsonl": rows("train b", 1),
        "dev/x.jsonl": rows("dev", 2),
    },
    "one_file": {
        "conversations.jsonl": rows("all", 4),
        ".cache/huggingface/stale.jsonl": rows("hidden", 2),
        "README.md": "---\nlicense: mit\n---\n# No configs here\n",
    },
    "configs": {
        "README.md": "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \"raw/part-*.jsonl\"\n"
                     "  - split: test\n    path: held_out.jsonl\n---\n# A card\n",
        "raw/part-1.jsonl": rows("part 1", 2),
        "raw/part-2.jsonl": rows("part 2", 1),
        "held_out.jsonl": rows("held out", 1),
        "train.jsonl": rows("not named by the configs", 5),
    },
}

shutil.rmtree(ROOT, ignore_errors=True)
expected = {}
for layout, files in LAYOUTS.items():
    base = os.path.join(ROOT, layout)
    for name, content in files.items():
        path = os.path.join(base, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(content, str):
            with open(path, "w") as f:
                f.write(content)
        elif name.endswith(".parquet"):
            parquet(path, content)
        else:
            jsonl(path, content)
    loaded = datasets.load_dataset(base)
    expected[layout] = {split: [row["text"] for row in loaded[split]] for split in loaded}
with open(os.path.join(ROOT, "expected.json"), "w") as f:
    json.dump({"datasets": datasets.__version__, "layouts": expected}, f, indent=1, sort_keys=True)
    f.write("\n")
print(json.dumps(expected, indent=1))
