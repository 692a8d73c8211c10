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
    matches!(extension, "parquet" | "arrow")
        || path.join("state.json").is_file()
        || path.join("dataset_dict.json").is_file()
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

/// The data files nibble reads from a repository folder.
const DATA_EXTENSIONS: &[&str] = &["jsonl", "json", "parquet", "arrow"];

/// The splits `datasets` knows by name, each with the words that name it in file and folder names.
const SPLIT_KEYWORDS: &[(&str, &[&str])] = &[
    ("train", &["train", "training"]),
    ("validation", &["validation", "valid", "dev", "val"]),
    ("test", &["test", "testing", "eval", "evaluation"]),
];

/// What may stand beside a split's keyword in a name (datasets' NON_WORDS_CHARS).
const SEPARATORS: &str = "[-._ 0-9]";

/// The splits of a folder laid out as a Hugging Face Hub dataset repository (what `huggingface-cli
/// download --repo-type dataset` leaves), each with its data files in order, as `load_dataset(folder)`
/// finds them: the files its README.md's `configs` names, else the Hub's sharded
/// `data/{split}-NNNNN-of-NNNNN.*` files, else folders named for splits, else files named for them
/// (`train.jsonl`, `my_dev-set.parquet`), else every file as train. Hidden files (the download's
/// .cache) and the README are not data. None: `dir` is not such a folder (a folder `datasets` saved).
pub fn repository_splits(dir: &Path) -> Result<Option<Splits<PathBuf>>> {
    if !dir.is_dir() || dir.join("state.json").is_file() || dir.join("dataset_dict.json").is_file()
    {
        return Ok(None);
    }
    let mut files = Vec::new();
    list_files(dir, "", &mut files)?;
    files.sort();
    let splits = match readme_configs(dir)? {
        Some(patterns) => patterns,
        None => default_split_patterns(&files),
    };
    let mut out = Vec::new();
    for (split, patterns) in splits {
        let matchers: Vec<regex::Regex> = patterns.iter().map(|p| glob_regex(p)).collect();
        let chosen: Vec<PathBuf> = files
            .iter()
            .filter(|f| matchers.iter().any(|m| m.is_match(f)))
            .filter(|f| {
                let extension = Path::new(f.as_str()).extension().and_then(|e| e.to_str());
                extension.is_some_and(|e| DATA_EXTENSIONS.contains(&e))
            })
            .map(|f| dir.join(f))
            .collect();
        if !chosen.is_empty() {
            out.push((split, chosen));
        }
    }
    Ok(Some(out))
}

/// The data files of `path` read as `datasets` reads a repository folder: the train split of a
/// folder, or `FOLDER/SPLIT` (not itself a path) for another split. None: `path` is neither.
pub fn repository_split_files(path: &Path) -> Result<Option<Vec<PathBuf>>> {
    let (dir, split) = if path.is_dir() {
        (path.to_path_buf(), "train".to_string())
    } else if path.exists() {
        return Ok(None);
    } else {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Ok(None);
        };
        // A split's name, not a missing file's.
        let name = name.to_string_lossy().into_owned();
        if name.contains('.') || !parent.is_dir() {
            return Ok(None);
        }
        (parent.to_path_buf(), name)
    };
    let Some(splits) = repository_splits(&dir)? else {
        return Ok(None);
    };
    if let Some((_, files)) = splits.iter().find(|(s, _)| *s == split) {
        return Ok(Some(files.clone()));
    }
    let names: Vec<&str> = splits.iter().map(|(s, _)| s.as_str()).collect();
    let holds = match names.is_empty() {
        true => "it holds no data files (json, jsonl, parquet, arrow)".to_string(),
        false => format!("its splits, as `datasets` finds them: {}", names.join(", ")),
    };
    Err(Error::Invalid(match path.is_dir() {
        true => format!(
            "{}: no `train` split to read; {holds} (give FOLDER/SPLIT)",
            dir.display()
        ),
        false => format!(
            "{}: no such file or folder, nor a split of {} ({holds})",
            path.display(),
            dir.display()
        ),
    }))
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
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
/// none), `**` anything, `*` and `?` within one name, `[...]` a class.
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
                    re.extend(&chars[i..i + end + 1]);
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
    // Built from a pattern's pieces, each escaped or a class taken whole; a class regex rejects
    // matches nothing.
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
        return order
            .into_iter()
            .map(|split| {
                let pattern = format!(
                    "data/{split}-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]*.*"
                );
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
        let splits: Vec<(String, Vec<String>)> = SPLIT_KEYWORDS
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

/// The data files a repository's README.md names in the YAML block that opens it (`configs`: the
/// one marked `default: true`, else the one named `default`, else the first), by split. None: the
/// README names none.
fn readme_configs(dir: &Path) -> Result<Option<Splits<String>>> {
    let readme = dir.join("README.md");
    let Ok(text) = std::fs::read_to_string(&readme) else {
        return Ok(None);
    };
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
    let docs = yaml_rust2::YamlLoader::load_from_str(block)
        .map_err(|e| bad(format!("its YAML header is not YAML: {e}")))?;
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
        })
        .or_else(|| configs.first());
    let Some(config) = config else {
        return Ok(None);
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
    let data_files = &config["data_files"];
    let splits = match data_files {
        yaml_rust2::Yaml::Array(items) if items.iter().all(|i| i.as_hash().is_some()) => items
            .iter()
            .map(|i| {
                let split = i["split"].as_str().unwrap_or("train").to_string();
                (split, strings(&i["path"]))
            })
            .collect(),
        yaml_rust2::Yaml::BadValue => return Ok(None),
        other => vec![("train".to_string(), strings(other))],
    };
    Ok(Some(splits))
}
