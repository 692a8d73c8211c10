//! ComfyUI's quantized one-file models ("fp8mixed", "fp8_scaled"): which layers hold 8-bit weights.
//!
//! ComfyUI marks each quantized layer `X` with a `X.comfy_quant` tensor (UTF-8 JSON in bytes,
//! `{"format": "float8_e4m3fn", ...}`), or lists them in the header's `_quantization_metadata`
//! (`{"layers": {"X": {"format": ...}}}`); older files carry a `scaled_fp8` tensor and name each
//! scale `X.scale_weight` (comfy/utils.py `convert_old_quants` turns those into the markers). An
//! 8-bit layer's weight is its codes times the float32 scalar `X.weight_scale` (comfy-kitchen's
//! `dequantize_per_tensor_fp8`); layers without a marker are plain 16-bit tensors. Other formats
//! (nvfp4, mxfp8, int8) are refused by name rather than guessed at.

use crate::error::{Error, Result};
use crate::source::{Float8, SafetensorsFile};
use std::collections::BTreeMap;

/// The tensor name suffix of a layer's marker.
pub const MARKER: &str = ".comfy_quant";
/// The older files' name of a weight's scale (now `weight_scale`).
pub const LEGACY_SCALE: &str = ".scale_weight";
/// The tensor that marks an older file as scaled fp8.
const LEGACY_FILE_MARKER: &str = "scaled_fp8";

/// The formats nibble reads, by the name ComfyUI gives them.
fn format_of(name: &str) -> Option<Float8> {
    match name {
        "float8_e4m3fn" => Some(Float8::E4M3),
        "float8_e5m2" => Some(Float8::E5M2),
        _ => None,
    }
}

/// Checks that each layer ComfyUI's markers name in `file` (`X` of `X.weight`, as the file names
/// it) is stored in the 8-bit type its marker says; any other format is refused naming the weight.
/// The scales are the loader's part, as for FP8 files that carry no markers.
pub fn check_markers(file: &SafetensorsFile) -> Result<()> {
    let path = file.path();
    let mut formats: BTreeMap<String, String> = BTreeMap::new();
    let legacy_marker = file
        .tensor_names()
        .find(|n| n.rsplit('.').next() == Some(LEGACY_FILE_MARKER));
    if let Some(text) = file.metadata().get("_quantization_metadata") {
        let bad = |why: String| Error::Safetensors {
            path: path.to_path_buf(),
            msg: format!("header `_quantization_metadata`: {why}"),
        };
        let meta: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let layers = meta
            .get("layers")
            .and_then(|l| l.as_object())
            .ok_or_else(|| bad("no `layers` object".into()))?;
        for (layer, conf) in layers {
            let format = conf
                .as_str()
                .or_else(|| conf.get("format")?.as_str())
                .ok_or_else(|| bad(format!("layer `{layer}` names no format")))?;
            formats.insert(layer.clone(), format.to_string());
        }
    } else if let Some(marker) = legacy_marker {
        let prefix = marker.strip_suffix(LEGACY_FILE_MARKER).unwrap_or_default();
        for name in file.tensor_names() {
            if let Some(layer) = name.strip_suffix(LEGACY_SCALE)
                && name.starts_with(prefix)
            {
                // ComfyUI names e4m3 for all of them; the codes are read as the type they are
                // stored in.
                let weight = file.info(&format!("{layer}.weight")).map(|i| i.dtype);
                let format = match weight.and_then(Float8::of) {
                    Some(Float8::E5M2) => "float8_e5m2",
                    _ => "float8_e4m3fn",
                };
                formats.insert(layer.to_string(), format.into());
            }
        }
    }
    for name in file.tensor_names() {
        let Some(layer) = name.strip_suffix(MARKER) else {
            continue;
        };
        let bad = |why: &str| Error::tensor(path, name, why);
        let conf: serde_json::Value = std::str::from_utf8(file.raw(name)?)
            .ok()
            .and_then(|text| serde_json::from_str(text).ok())
            .ok_or_else(|| bad("not ComfyUI's quantization marker (UTF-8 JSON bytes)"))?;
        let format = conf
            .get("format")
            .and_then(|f| f.as_str())
            .ok_or_else(|| bad("ComfyUI's quantization marker names no `format`"))?;
        formats.insert(layer.to_string(), format.to_string());
    }
    for (layer, format) in formats {
        let weight = format!("{layer}.weight");
        let Some(expected) = format_of(&format) else {
            return Err(Error::tensor(
                path,
                &weight,
                format!(
                    "ComfyUI's `{format}` layers are not read (nibble reads its float8_e4m3fn and \
                     float8_e5m2 ones): give the 16-bit file or the model's folder"
                ),
            ));
        };
        let stored = file
            .info(&weight)
            .ok_or_else(|| Error::tensor(path, &weight, "missing (ComfyUI marks it quantized)"))?;
        if Float8::of(stored.dtype) != Some(expected) {
            return Err(Error::tensor(
                path,
                &weight,
                format!(
                    "stored as {:?}, but ComfyUI's marker says `{format}`",
                    stored.dtype
                ),
            ));
        }
    }
    Ok(())
}
