//! Datasets stored as tables: Parquet files (what `datasets`, pyarrow and polars write, and what the
//! Hugging Face Hub serves) and the folders `datasets` saves (`save_to_disk`: Arrow stream files listed
//! in state.json). Each row becomes the JSON object the JSONL reader parses, so every row shape reads
//! from every format; a cell a table leaves empty (null) is left out, as a JSONL row would omit it.

use crate::error::{Error, Result};
use arrow_array::{Array, RecordBatch, cast::AsArray};
use arrow_schema::DataType;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// Whether `path` is a table this module reads: a `.parquet` or `.arrow` file, or a folder saved by
/// `datasets`.
pub fn is_table(path: &Path) -> bool {
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(extension, "parquet" | "arrow") || saved_by_datasets(path)
}

/// Whether `dir` is a folder `datasets` saved (`save_to_disk`: one split, or a DatasetDict).
fn saved_by_datasets(dir: &Path) -> bool {
    dir.join("state.json").is_file() || dir.join("dataset_dict.json").is_file()
}

/// The rows of the table at `path`, as JSON objects.
pub fn rows(path: &Path) -> Result<Vec<Value>> {
    if path.is_dir() {
        return dataset_folder_rows(path);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => parquet_rows(path),
        _ => arrow_rows(path),
    }
}

/// A JSON object without its null members.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    }
}

fn parquet_rows(path: &Path) -> Result<Vec<Value>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let bad = |e: parquet::errors::ParquetError| {
        Error::Invalid(format!(
            "{}: not a Parquet file nibble can read: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(bad)?;
    let mut rows = Vec::with_capacity(reader.metadata().file_metadata().num_rows().max(0) as usize);
    for row in reader.get_row_iter(None).map_err(bad)? {
        rows.push(without_nulls(row.map_err(bad)?.to_json_value()));
    }
    Ok(rows)
}

/// An Arrow IPC file: the stream format `datasets` writes, or the file format (`ARROW1` magic).
fn arrow_rows(path: &Path) -> Result<Vec<Value>> {
    let bad = |e: arrow_schema::ArrowError| {
        Error::Invalid(format!(
            "{}: not an Arrow file nibble can read: {e}",
            path.display()
        ))
    };
    let open = || std::fs::File::open(path).map_err(|e| Error::io(path, e));
    let mut magic = [0u8; 6];
    let is_file_format = {
        use std::io::Read;
        open()?.read_exact(&mut magic).is_ok() && &magic == b"ARROW1"
    };
    let batches: Vec<RecordBatch> = if is_file_format {
        let reader = arrow_ipc::reader::FileReader::try_new(open()?, None).map_err(bad)?;
        reader.collect::<std::result::Result<_, _>>().map_err(bad)?
    } else {
        let reader = arrow_ipc::reader::StreamReader::try_new(open()?, None).map_err(bad)?;
        reader.collect::<std::result::Result<_, _>>().map_err(bad)?
    };
    let mut rows = Vec::new();
    for batch in &batches {
        let schema = batch.schema();
        for i in 0..batch.num_rows() {
            let mut row = Map::new();
            for (field, column) in schema.fields().iter().zip(batch.columns()) {
                let value = cell(column.as_ref(), i);
                if !value.is_null() {
                    row.insert(field.name().clone(), value);
                }
            }
            rows.push(Value::Object(row));
        }
    }
    Ok(rows)
}

/// Row `i` of `array` as JSON: the types `datasets` stores text data in (strings, numbers, booleans,
/// lists, structs); other types as null (left out of the row).
fn cell(array: &dyn Array, i: usize) -> Value {
    if array.is_null(i) {
        return Value::Null;
    }
    let number = |v: f64| serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number);
    match array.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(array.as_boolean().value(i)),
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(i).to_string()),
        DataType::Int8 => array
            .as_primitive::<arrow_array::types::Int8Type>()
            .value(i)
            .into(),
        DataType::Int16 => array
            .as_primitive::<arrow_array::types::Int16Type>()
            .value(i)
            .into(),
        DataType::Int32 => array
            .as_primitive::<arrow_array::types::Int32Type>()
            .value(i)
            .into(),
        DataType::Int64 => array
            .as_primitive::<arrow_array::types::Int64Type>()
            .value(i)
            .into(),
        DataType::UInt8 => array
            .as_primitive::<arrow_array::types::UInt8Type>()
            .value(i)
            .into(),
        DataType::UInt16 => array
            .as_primitive::<arrow_array::types::UInt16Type>()
            .value(i)
            .into(),
        DataType::UInt32 => array
            .as_primitive::<arrow_array::types::UInt32Type>()
            .value(i)
            .into(),
        DataType::UInt64 => array
            .as_primitive::<arrow_array::types::UInt64Type>()
            .value(i)
            .into(),
        DataType::Float32 => number(
            array
                .as_primitive::<arrow_array::types::Float32Type>()
                .value(i) as f64,
        ),
        DataType::Float64 => number(
            array
                .as_primitive::<arrow_array::types::Float64Type>()
                .value(i),
        ),
        DataType::List(_) => list(array.as_list::<i32>().value(i).as_ref()),
        DataType::LargeList(_) => list(array.as_list::<i64>().value(i).as_ref()),
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut object = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                let value = cell(column.as_ref(), i);
                if !value.is_null() {
                    object.insert(field.name().clone(), value);
                }
            }
            Value::Object(object)
        }
        // Columns no row shape uses (timestamps, images, ...): left out, as a JSONL row would.
        _ => Value::Null,
    }
}

fn list(values: &dyn Array) -> Value {
    Value::Array((0..values.len()).map(|j| cell(values, j)).collect())
}

/// The rows of a folder `datasets` saved: its Arrow files in state.json's order. A `DatasetDict`
/// folder (one sub-folder per split) is refused naming its splits.
fn dataset_folder_rows(dir: &Path) -> Result<Vec<Value>> {
    let dict = dir.join("dataset_dict.json");
    if dict.is_file() {
        let text = crate::fsutil::read_to_string(&dict).map_err(|e| Error::io(&dict, e))?;
        let splits: Vec<String> = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["splits"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        return Err(Error::Invalid(format!(
            "{} holds several splits ({}): give one split's folder, such as {}",
            dir.display(),
            splits.join(", "),
            dir.join(splits.first().map_or("train", String::as_str))
                .display()
        )));
    }
    let state = dir.join("state.json");
    let text = crate::fsutil::read_to_string(&state).map_err(|e| Error::io(&state, e))?;
    let files: Vec<PathBuf> = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v["_data_files"].as_array().cloned())
        .ok_or_else(|| Error::Config {
            path: state.clone(),
            msg: "no `_data_files` list (not a folder saved by `datasets`?)".into(),
        })?
        .iter()
        .map(|f| f["filename"].as_str().map(|name| dir.join(name)))
        .collect::<Option<_>>()
        .ok_or_else(|| Error::Config {
            path: state.clone(),
            msg: "an entry of `_data_files` has no `filename`".into(),
        })?;
    let mut rows = Vec::new();
    for file in files {
        rows.extend(arrow_rows(&file)?);
    }
    Ok(rows)
}

/// A dataset's splits in order, each with its files (or the patterns that find them).
pub type Splits<T> = Vec<(String, Vec<T>)>;

/// Files `datasets` never takes for data in a repository folder.
const NOT_DATA: &[&str] = &[
    "README.md",
    "config.json",
    "dataset_info.json",
    "dataset_infos.json",
    "dummy_data.zip",
    "dataset_dict.json",
];

/// The splits `datasets` knows by name, each with the words that name it in file and folder names.
const SPLIT_KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// What may stand beside a split's keyword in a name (datasets' NON_WORDS_CHARS).
const SEPARATORS: &str = "[-._ 0-9]";

/// The extensions of the file formats nibble reads, each with the `datasets` builder that reads it.
const FORMATS: &[(&str, &str)] = &[
    ("parquet", "parquet"),
    ("arrow", "arrow"),
    ("jsonl", "json"),
    ("json", "json"),
];

/// The extensions of the tables and text `datasets` has a builder for (its ALL_ALLOWED_EXTENSIONS
/// but for media): files of any other extension, or none, are not data to it.
const DATASETS_EXTENSIONS: &[&str] = &[
    "parquet",
    "geoparquet",
    "gpq",
    "arrow",
    "jsonl",
    "json",
    "ndjson",
    "csv",
    "tsv",
    "txt",
    "tar",
    "xml",
    "hdf5",
    "h5",
    "zip",
];

/// A repository's README.md `configs` entry: where its data lies.
struct RepoConfig {
    data_dir: Option<String>,
    /// By split; None: the default patterns under `data_dir`.
    data_files: Option<Splits<String>>,
}

/// The splits of a folder laid out as a Hugging Face Hub dataset repository (what `huggingface-cli
/// download --repo-type dataset` leaves), each with its data files in order, as `load_dataset(folder)`
/// finds them: the files its README.md's `configs` names (under its `data_dir`), else the Hub's
/// sharded `data/{split}-NNNNN-of-NNNNN.*` files, else folders named for splits, else files named for
/// them (`train.jsonl`, `my_dev-set.parquet`), else every file as train; of each split, the files of
/// its most common format (Parquet winning a draw), which must be one format for all splits. Hidden
/// files and folders (the download's .cache), `__` ones and the README are not data. None: `dir` is
/// not such a folder (a folder `datasets` saved).
pub fn repository_splits(dir: &Path) -> Result<Option<Splits<PathBuf>>> {
    if !dir.is_dir() || saved_by_datasets(dir) {
        return Ok(None);
    }
    let config = readme_config(dir)?;
    let base = config
        .as_ref()
        .and_then(|c| c.data_dir.clone())
        .map_or(String::new(), |d| format!("{}/", d.trim_matches('/')));
    let mut files = Vec::new();
    let root = dir.join(&base);
    if root.is_dir() {
        list_files(&root, "", &mut files)?;
    }
    files.sort();
    let patterns = match config.and_then(|c| c.data_files) {
        Some(patterns) => patterns,
        None => default_split_patterns(&files),
    };
    let mut splits = Vec::new();
    for (split, patterns) in patterns {
        let mut chosen: Vec<&String> = Vec::new();
        for pattern in &patterns {
            let pattern = pattern.strip_prefix("./").unwrap_or(pattern);
            let matcher = glob_regex(pattern);
            let matched: Vec<&String> = files.iter().filter(|f| matcher.is_match(f)).collect();
            // datasets skips a wildcard that matches nothing, and refuses a file that is not there.
            if matched.is_empty() && !pattern.contains(['*', '?', '[']) {
                return Err(Error::Invalid(format!(
                    "{}: the split `{split}` names {pattern}, which is not there",
                    dir.display()
                )));
            }
            for f in matched {
                if !chosen.contains(&f) {
                    chosen.push(f);
                }
            }
        }
        if !chosen.is_empty() {
            splits.push((split, chosen));
        }
    }
    // Each split is read by the builder of its most common file format; all splits must agree.
    let mut builder: Option<(String, &str)> = None;
    let mut out = Vec::new();
    let extension = |f: &str| {
        Path::new(f)
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    for (split, mut chosen) in splits {
        // datasets resolves patterns to the extensions it has builders for: a LICENSE or a notes.md
        // beside the data is not data.
        chosen.retain(|f| DATASETS_EXTENSIONS.contains(&extension(f).as_str()));
        if chosen.is_empty() {
            continue;
        }
        let mut counts: Vec<(String, usize)> = Vec::new();
        for f in &chosen {
            let e = extension(f);
            match counts.iter_mut().find(|(x, _)| *x == e) {
                Some((_, n)) => *n += 1,
                None => counts.push((e, 1)),
            }
        }
        let preference = |e: &str| match e {
            "parquet" => 4,
            "arrow" => 3,
            "jsonl" => 2,
            "json" => 1,
            _ => 0,
        };
        counts.sort_by(|a, b| (b.1, preference(&b.0), &b.0).cmp(&(a.1, preference(&a.0), &a.0)));
        let top = counts[0].0.clone();
        let Some(&(_, split_builder)) = FORMATS.iter().find(|(e, _)| *e == top) else {
            return Err(Error::Invalid(format!(
                "{}: the split `{split}` is {top} files, which nibble does not read (JSONL, JSON, \
                 Parquet or Arrow)",
                dir.display()
            )));
        };
        match &builder {
            Some((first_split, b)) if *b != split_builder => {
                return Err(Error::Invalid(format!(
                    "{}: the split `{first_split}` is {b} files and `{split}` {split_builder}; \
                     `datasets` refuses splits of different formats too",
                    dir.display()
                )));
            }
            _ => {}
        }
        let files: Vec<PathBuf> = chosen
            .iter()
            .filter(|f| {
                FORMATS
                    .iter()
                    .any(|(e, b)| *b == split_builder && extension(f) == *e)
            })
            .map(|f| root.join(f.as_str()))
            .collect();
        if builder.is_none() {
            builder = Some((split.clone(), split_builder));
        }
        out.push((split, files));
    }
    Ok(Some(out))
}

/// The data files of `path` read as `datasets` reads a repository folder: the train split of a
/// folder, or `FOLDER/SPLIT` for another split (a name that is not itself a path, or a folder of the
/// repository that is that split). None: `path` is neither.
pub fn repository_split_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let parent = path.parent().filter(|p| p.is_dir());
    let split_of_parent = |name: &str| -> Result<Option<Vec<PathBuf>>> {
        let Some(parent) = parent else {
            return Ok(None);
        };
        let splits = repository_splits(parent)?.unwrap_or_default();
        Ok(splits.into_iter().find(|(s, _)| s == name).map(|(_, f)| f))
    };
    if path.is_dir() {
        let Some(own) = repository_splits(path)? else {
            return Ok(None);
        };
        if let Some((_, files)) = own.iter().find(|(s, _)| s == "train") {
            return Ok(Some(files.clone()));
        }
        // A folder of the repository above that is one of its splits (`test/test.jsonl`).
        if let Some(files) = name.as_deref().map(split_of_parent).transpose()?.flatten() {
            return Ok(Some(files));
        }
        return Err(no_split(path, path, "train", &own));
    }
    if path.exists() {
        return Ok(None);
    }
    // A missing path names a split only where a split could be so named: walking the folder above
    // for any missing name would read a home folder's tree for a typo.
    let (Some(name), Some(dir)) = (name, parent) else {
        return Ok(None);
    };
    if name.contains('.') || !plausible_split(dir, &name)? {
        return Ok(None);
    }
    let splits = repository_splits(dir)?.unwrap_or_default();
    match splits.iter().find(|(s, _)| *s == name) {
        Some((_, files)) => Ok(Some(files.clone())),
        None => Err(no_split(path, dir, &name, &splits)),
    }
}

/// Whether `name` could be a split of the repository folder `dir`: a split's name or keyword, a
/// split its README names, or the Hub's sharded `data/{name}-...` files.
fn plausible_split(dir: &Path, name: &str) -> Result<bool> {
    if SPLIT_KEYWORDS
        .iter()
        .any(|(split, words)| *split == name || words.contains(&name))
    {
        return Ok(true);
    }
    if let Some(RepoConfig {
        data_files: Some(splits),
        ..
    }) = readme_config(dir)?
    {
        return Ok(splits.iter().any(|(s, _)| s == name));
    }
    let shard = format!("{name}-");
    Ok(std::fs::read_dir(dir.join("data")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&shard))
    }))
}

fn no_split(path: &Path, dir: &Path, split: &str, splits: &Splits<PathBuf>) -> Error {
    let names: Vec<&str> = splits.iter().map(|(s, _)| s.as_str()).collect();
    let holds = match names.is_empty() {
        true => "it holds no data files (JSONL, JSON, Parquet, Arrow)".to_string(),
        false => format!("its splits, as `datasets` finds them: {}", names.join(", ")),
    };
    Error::Invalid(match path == dir {
        true => format!(
            "{}: no `{split}` split to read; {holds} (give FOLDER/SPLIT)",
            dir.display()
        ),
        false => format!(
            "{}: no such file or folder, nor a split of {} ({holds})",
            path.display(),
            dir.display()
        ),
    })
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.starts_with("__") {
            continue;
        }
        let relative = format!("{prefix}{name}");
        let kind = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        if kind.is_dir() {
            list_files(&entry.path(), &format!("{relative}/"), out)?;
        } else if !NOT_DATA.contains(&name.as_str()) {
            out.push(relative);
        }
    }
    Ok(())
}

/// fsspec's glob as a regular expression over '/'-separated relative paths: `**/` any folders (or
/// none), `**` anything, `*` and `?` within one name, `[...]` a class (`[!...]` its complement).
fn glob_regex(pattern: &str) -> regex::Regex {
    let mut re = String::from("^");
    let chars: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                if chars.get(i + 2) == Some(&'/') {
                    re.push_str("(?:.*/)?");
                    i += 3;
                } else {
                    re.push_str(".*");
                    i += 2;
                }
                continue;
            }
            '*' => re.push_str("[^/]*"),
            '?' => re.push_str("[^/]"),
            '[' => match chars[i..].iter().position(|&c| c == ']') {
                Some(end) => {
                    let class: String = chars[i + 1..i + end].iter().collect();
                    let class = match class.strip_prefix('!') {
                        Some(rest) => format!("^{rest}"),
                        None => class,
                    };
                    re.push_str(&format!("[{}]", class.replace('\\', r"\\")));
                    i += end + 1;
                    continue;
                }
                None => re.push_str(r"\["),
            },
            c => re.push_str(&regex::escape(&c.to_string())),
        }
        i += 1;
    }
    re.push('$');
    // A class the regex crate rejects matches nothing, as no name could be meant by it.
    regex::Regex::new(&re).unwrap_or_else(|_| regex::Regex::new("^$").expect("a valid pattern"))
}

/// The splits and their patterns `datasets` takes for a folder whose README names none (its
/// `_get_data_files_patterns`): the first of its rules under which some file falls.
fn default_split_patterns(files: &[String]) -> Splits<String> {
    let sharded = regex::Regex::new(r"^data/(\w+(?:\.\w+)*)-[0-9]{5}-of-[0-9]{5}[^/]*\.[^/]*$")
        .expect("valid");
    let mut shards: Vec<String> = files
        .iter()
        .filter_map(|f| sharded.captures(f).map(|c| c[1].to_string()))
        .collect();
    shards.sort();
    shards.dedup();
    if !shards.is_empty() {
        let known = SPLIT_KEYWORDS.iter().map(|(s, _)| *s);
        let mut order: Vec<String> = known
            .filter(|s| shards.iter().any(|x| x == s))
            .map(String::from)
            .collect();
        let others: Vec<String> = shards
            .iter()
            .filter(|s| !order.contains(s))
            .cloned()
            .collect();
        order.extend(others);
        let shard = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*";
        return order
            .into_iter()
            .map(|split| {
                let pattern = format!("data/{split}{shard}");
                (split, vec![pattern])
            })
            .collect();
    }
    let folder_names = [
        "**/{k}/**",
        "**/{k}{s}*/**",
        "**/*{s}{k}/**",
        "**/*{s}{k}{s}*/**",
    ];
    let file_names = ["**/{k}{s}*", "**/*{s}{k}{s}*"];
    for rule in [&folder_names[..], &file_names[..]] {
        let splits: Splits<String> = SPLIT_KEYWORDS
            .iter()
            .map(|(split, keywords)| {
                let patterns = keywords
                    .iter()
                    .flat_map(|k| {
                        rule.iter()
                            .map(move |p| p.replace("{k}", k).replace("{s}", SEPARATORS))
                    })
                    .collect::<Vec<_>>();
                (split.to_string(), patterns)
            })
            .filter(|(_, patterns)| {
                patterns
                    .iter()
                    .map(|p| glob_regex(p))
                    .any(|m| files.iter().any(|f| m.is_match(f)))
            })
            .collect();
        if !splits.is_empty() {
            return splits;
        }
    }
    vec![("train".into(), vec!["**".into()])]
}

/// YAML as nibble reads it from files it did not write: aliases (`*name`) refused, since the YAML
/// reader copies an alias's value wherever it appears, and a few lines of nested aliases would fill
/// memory.
pub fn yaml_without_aliases(text: &str) -> std::result::Result<Vec<yaml_rust2::Yaml>, String> {
    // An alias starts a node: at a line's start, or after a space, `[`, `{` or `,` (not inside a
    // name, as in "part-*.jsonl").
    let alias = regex::Regex::new(r"(?m)(?:^|[\s\[{,])\*[A-Za-z0-9_]").expect("valid");
    if alias.is_match(text) {
        return Err("holds YAML aliases (*name), which nibble does not read".into());
    }
    let mut docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
    yaml11_booleans(text, &mut docs)?;
    Ok(docs)
}

/// PyYAML, which TRL, `datasets` and the Hub read these files with, follows YAML 1.1: a plain
/// (unquoted, untagged) yes, no, on or off, in any of three casings, is a boolean there, where YAML
/// 1.2's reader keeps it as text; quoted, it stays text in both. `docs` (read from `text`) get
/// PyYAML's booleans in their values (keys stay as read). The parser's scalar events come in the
/// order the documents hold their leaves (aliases are refused, duplicate keys are an error), so the
/// n-th scalar event is the n-th leaf.
fn yaml11_booleans(text: &str, docs: &mut [yaml_rust2::Yaml]) -> std::result::Result<(), String> {
    use yaml_rust2::Yaml;
    use yaml_rust2::parser::{MarkedEventReceiver, Parser};
    use yaml_rust2::scanner::{Marker, TScalarStyle};
    struct Leaves(Vec<Option<bool>>);
    impl MarkedEventReceiver for Leaves {
        fn on_event(&mut self, event: yaml_rust2::Event, _: Marker) {
            if let yaml_rust2::Event::Scalar(value, style, _, tag) = event {
                let plain = style == TScalarStyle::Plain && tag.is_none();
                self.0.push(plain.then(|| yaml11_bool(&value)).flatten());
            }
        }
    }
    fn walk(node: &mut Yaml, leaves: &mut std::vec::IntoIter<Option<bool>>, keep: bool) {
        match node {
            Yaml::Array(items) => items.iter_mut().for_each(|i| walk(i, leaves, keep)),
            Yaml::Hash(map) => {
                for (key, value) in map.iter_mut() {
                    let mut key = key.clone();
                    walk(&mut key, leaves, true);
                    walk(value, leaves, keep);
                }
            }
            leaf => {
                if let (Some(Some(b)), false, Yaml::String(_)) = (leaves.next(), keep, &*leaf) {
                    *leaf = Yaml::Boolean(b);
                }
            }
        }
    }
    let mut leaves = Leaves(Vec::new());
    Parser::new_from_str(text)
        .load(&mut leaves, true)
        .map_err(|e| e.to_string())?;
    let mut leaves = leaves.0.into_iter();
    for doc in docs {
        walk(doc, &mut leaves, false);
    }
    Ok(())
}

/// A YAML 1.1 boolean PyYAML resolves from a plain scalar (its `bool` implicit resolver).
fn yaml11_bool(text: &str) -> Option<bool> {
    match text {
        "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => Some(true),
        "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// Where a repository's README.md puts its data, in the YAML block that opens it (`configs`: the one
/// marked `default: true`, else the one named `default`, else the only one). None: it says nothing.
fn readme_config(dir: &Path) -> Result<Option<RepoConfig>> {
    let readme = dir.join("README.md");
    let Ok(text) = std::fs::read_to_string(&readme) else {
        return Ok(None);
    };
    let text = text.replace("\r\n", "\n");
    let Some(block) = text
        .strip_prefix("---\n")
        .and_then(|rest| rest.split_once("\n---").map(|(yaml, _)| yaml))
    else {
        return Ok(None);
    };
    let bad = |msg: String| Error::Config {
        path: readme.clone(),
        msg,
    };
    let docs = yaml_without_aliases(block).map_err(|e| bad(format!("its YAML header: {e}")))?;
    let Some(configs) = docs.first().and_then(|d| d["configs"].as_vec()) else {
        return Ok(None);
    };
    let config = configs
        .iter()
        .find(|c| c["default"].as_bool() == Some(true))
        .or_else(|| {
            configs
                .iter()
                .find(|c| c["config_name"].as_str() == Some("default"))
        });
    let config = match (config, configs.as_slice()) {
        (Some(config), _) => config,
        (None, [only]) => only,
        (None, []) => return Ok(None),
        (None, _) => {
            let names: Vec<&str> = configs
                .iter()
                .filter_map(|c| c["config_name"].as_str())
                .collect();
            return Err(bad(format!(
                "names several configs ({}) and none is the default; `datasets` asks for one too. \
                 Give the files of one as --data",
                names.join(", ")
            )));
        }
    };
    let strings = |y: &yaml_rust2::Yaml| -> Vec<String> {
        match y {
            yaml_rust2::Yaml::String(s) => vec![s.clone()],
            yaml_rust2::Yaml::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(String::from))
                .collect(),
            _ => Vec::new(),
        }
    };
    let data_files = match &config["data_files"] {
        yaml_rust2::Yaml::BadValue | yaml_rust2::Yaml::Null => None,
        yaml_rust2::Yaml::Array(items) if items.iter().all(|i| i.as_hash().is_some()) => Some(
            items
                .iter()
                .map(|i| {
                    let split = i["split"].as_str().unwrap_or("train").to_string();
                    (split, strings(&i["path"]))
                })
                .collect(),
        ),
        yaml_rust2::Yaml::Hash(by_split) => Some(
            by_split
                .iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), strings(v))))
                .collect(),
        ),
        other => Some(vec![("train".to_string(), strings(other))]),
    };
    let data_dir = config["data_dir"].as_str().map(String::from);
    Ok(Some(RepoConfig {
        data_dir,
        data_files,
    }))
}
