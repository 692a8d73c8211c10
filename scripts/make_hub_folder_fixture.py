"""Writes tests/fixtures/hub_folders/: dataset folders laid out as Hugging Face Hub dataset repositories
are (what `huggingface-cli download --repo-type dataset NAME --local-dir DIR` leaves), and in
expected.json the rows of each split as `datasets.load_dataset(DIR)` finds them: the sharded
data/{split}-NNNNN-of-NNNNN files the Hub writes, splits named by folders or by file names (with the
keywords datasets knows: training, dev, eval, ...), a README.md whose `configs` names the files, one
file with no split in its name (all train), files that are not data beside it (LICENSE, notes.md),
and the hidden .cache folder the download leaves.

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
    "split_folders": {
        "train/train.jsonl": rows("train", 2),
        "test/test.jsonl": rows("test", 1),
    },
    "mixed_formats": {
        "train.jsonl": rows("jsonl", 1),
        "train_extra.parquet": rows("parquet extra", 1),
        "train_more.parquet": rows("parquet more", 2),
    },
    "data_dir": {
        "README.md": "---\nconfigs:\n- config_name: english\n  data_dir: en\n---\n",
        "en/train.jsonl": rows("en train", 2),
        "en/test.jsonl": rows("en test", 1),
        "fr/train.jsonl": rows("fr train", 2),
    },
    "listed_order": {
        "README.md": "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path:\n"
                     "    - b.jsonl\n    - ./a.jsonl\n---\n",
        "a.jsonl": rows("a", 1),
        "b.jsonl": rows("b", 1),
    },
    "crlf_readme": {
        "README.md": "---\r\nconfigs:\r\n- config_name: default\r\n  data_files: picked.jsonl\r\n---\r\n# Card\r\n",
        "picked.jsonl": rows("picked", 1),
        "other.jsonl": rows("other", 1),
    },
    "license_beside": {
        "conversations.jsonl": rows("all", 2),
        "LICENSE": "MIT License\n",
        "NOTICE": "Copyright the authors\n",
        "notes.md": "# How the rows were collected\n",
    },
    "validation_words": {
        "train.jsonl": rows("train", 1),
        "val.jsonl": rows("val", 1),
        "validation.jsonl": rows("validation", 1),
        "dev.jsonl": rows("dev", 1),
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
            with open(path, "w", newline="") as f:
                f.write(content)
        elif name.endswith(".parquet"):
            parquet(path, content)
        else:
            jsonl(path, content)
    loaded = datasets.load_dataset(base)
    # The splits in datasets' order, each with its rows in order.
    expected[layout] = [[split, [row["text"] for row in loaded[split]]] for split in loaded]
with open(os.path.join(ROOT, "expected.json"), "w") as f:
    json.dump({"datasets": datasets.__version__, "layouts": expected}, f, indent=1)
    f.write("\n")
print(json.dumps(expected, indent=1))
