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
