//! Image datasets for FLUX.2 LoRAs, in the layout ai-toolkit and kohya use: a folder of images (PNG,
//! JPEG, WebP) with a same-name `.txt` caption beside each. Each image is resized to cover its aspect
//! bucket at the chosen resolution (about resolution² pixels, sides multiples of 16) and centre-cropped
//! to it.

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// One training image and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageExample {
    pub image: PathBuf,
    pub caption: String,
}

const EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];
/// Image formats people keep datasets in that nibble does not decode.
const OTHER_IMAGE_EXTENSIONS: [&str; 9] = [
    "bmp", "gif", "tif", "tiff", "heic", "heif", "avif", "jxl", "jfif",
];

/// Sides are multiples of this (8x VAE, 2x2 patches).
pub const SIDE_MULTIPLE: usize = 16;

/// The longest caption file read (the text encoder reads 512 tokens of it at most).
const MAX_CAPTION_BYTES: u64 = 64 * 1024;

/// Buckets keep aspect ratios up to this (a wider image is cropped to it), so that a sliver does not
/// turn into thousands of tokens.
const MAX_ASPECT: f64 = 4.0;

/// The images of `dir` (sorted by name) with their captions. A caption's `[trigger]` becomes
/// `trigger`, or the trigger word is put first where the caption does not place it. An image without
/// a caption file takes `default_caption`, or is an error naming it where none is given; an empty
/// `.txt` means no caption, or `default_caption` where one is given.
pub fn scan_folder(
    dir: &Path,
    (trigger, default_caption): (Option<&str>, Option<&str>),
) -> Result<Vec<ImageExample>> {
    if trigger.is_some_and(|t| t.trim().is_empty()) {
        return Err(Error::Invalid(
            "--trigger is empty: give the word, or leave the option out".into(),
        ));
    }
    let trigger = trigger.map(str::trim);
    if dir.is_file() {
        return Err(Error::Invalid(format!(
            "{}: a file; a FLUX.2 run reads a folder of images, each with its .txt caption beside it",
            dir.display()
        )));
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    // Hidden files are no one's images (macOS writes `._name.png` beside each image on some disks).
    let hidden = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    };
    let mut images: Vec<PathBuf> = paths
        .iter()
        .filter(|p| {
            !hidden(p)
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        })
        .cloned()
        .collect();
    images.sort();
    warn_of_unread(&paths, &images, &hidden);
    if images.is_empty() {
        let subfolders = paths.iter().any(|p| p.is_dir() && !hidden(p));
        return Err(Error::Invalid(format!(
            "{}: no images (PNG, JPEG or WebP files with a .txt caption beside each){}",
            dir.display(),
            if subfolders {
                "; folders inside it are not read: give the folder that holds the images"
            } else {
                ""
            }
        )));
    }
    images
        .into_iter()
        .map(|image| {
            // `name.TXT` where `name.txt` is not there (cameras and Windows tools write capitals).
            let caption_path = ["txt", "TXT"]
                .map(|e| image.with_extension(e))
                .into_iter()
                .find(|p| p.exists())
                .unwrap_or_else(|| image.with_extension("txt"));
            // ai-toolkit's `default_caption`: for a missing caption, and in place of an empty one.
            if let Some(default) = default_caption
                && !caption_path.exists()
            {
                return Ok(ImageExample {
                    caption: with_trigger(default.trim(), trigger),
                    image,
                });
            }
            let size = std::fs::metadata(&caption_path).map_or(0, |m| m.len());
            if size > MAX_CAPTION_BYTES {
                return Err(Error::Invalid(format!(
                    "{}: {size} bytes, more than a caption's {MAX_CAPTION_BYTES}",
                    caption_path.display()
                )));
            }
            let text = crate::fsutil::read_to_string(&caption_path).map_err(|e| {
                if caption_path.exists() {
                    return Error::Invalid(format!(
                        "{}: the caption of {} cannot be read: {e}",
                        caption_path.display(),
                        image.display()
                    ));
                }
                Error::Invalid(format!(
                    "{}: no caption ({}: {e}); write one, or an empty file for none, or give \
                     --default-caption TEXT (\"\" for none) for every image without one",
                    image.display(),
                    caption_path.display()
                ))
            })?;
            // Notepad starts its UTF-8 files with a byte-order mark, which is no part of the caption.
            let text = text.trim_start_matches('\u{feff}').trim();
            let text = match default_caption {
                Some(default) if text.is_empty() => default.trim(),
                _ => text,
            };
            let caption = with_trigger(text, trigger);
            Ok(ImageExample { image, caption })
        })
        .collect()
}

/// Says which files of the folder a run leaves out that look meant for it: images in formats nibble
/// does not read, and captions with no image beside them (a dataset part converted, part not).
fn warn_of_unread(paths: &[PathBuf], images: &[PathBuf], hidden: &dyn Fn(&Path) -> bool) {
    let extension = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
    };
    let listed = |files: Vec<&PathBuf>| {
        let mut names: Vec<String> = files
            .iter()
            .map(|p| {
                p.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        let more = names.len().saturating_sub(5);
        names.truncate(5);
        match more {
            0 => names.join(", "),
            more => format!("{} and {more} more", names.join(", ")),
        }
    };
    let other_images: Vec<&PathBuf> = paths
        .iter()
        .filter(|p| !hidden(p) && p.is_file())
        .filter(|p| extension(p).is_some_and(|e| OTHER_IMAGE_EXTENSIONS.contains(&e.as_str())))
        .collect();
    if !other_images.is_empty() {
        log::warn!(
            "left out {} images in formats nibble does not read ({}): convert them to PNG, JPEG \
             or WebP to train on them",
            other_images.len(),
            listed(other_images)
        );
    }
    let stems: std::collections::HashSet<PathBuf> =
        images.iter().map(|p| p.with_extension("")).collect();
    let lonely_captions: Vec<&PathBuf> = paths
        .iter()
        .filter(|p| !hidden(p) && p.is_file() && extension(p).as_deref() == Some("txt"))
        .filter(|p| !stems.contains(&p.with_extension("")))
        .collect();
    if !lonely_captions.is_empty() {
        log::warn!(
            "left out {} captions with no PNG, JPEG or WebP image of their name beside them ({})",
            lonely_captions.len(),
            listed(lonely_captions)
        );
    }
}

fn with_trigger(caption: &str, trigger: Option<&str>) -> String {
    match trigger {
        Some(t) if caption.contains("[trigger]") => caption.replace("[trigger]", t),
        Some(t) if caption.is_empty() => t.to_string(),
        Some(t) => format!("{t}, {caption}"),
        // Without a trigger word the placeholder goes, as ai-toolkit drops it.
        None if caption.contains("[trigger]") => {
            let words: Vec<&str> = caption
                .split("[trigger]")
                .flat_map(str::split_whitespace)
                .collect();
            words.join(" ")
        }
        None => caption.to_string(),
    }
}

/// The bucket (width, height) of a `width` x `height` image at `resolution`: the image's aspect ratio
/// (within 1:4 and 4:1) with about resolution² pixels, each side rounded down to a multiple of 16 (at
/// least 16).
pub fn bucket(width: usize, height: usize, resolution: usize) -> (usize, usize) {
    let aspect = (width as f64 / height as f64).clamp(1.0 / MAX_ASPECT, MAX_ASPECT);
    let area = (resolution * resolution) as f64;
    let h = (area / aspect).sqrt();
    let w = h * aspect;
    let round = |v: f64| ((v as usize) / SIDE_MULTIPLE).max(1) * SIDE_MULTIPLE;
    (round(w), round(h))
}

/// Whether JPEG data reaches its end-of-image marker, walking its segments from the start: the decoder
/// fills a file cut short with grey and says nothing, where Pillow (kohya's and ai-toolkit's reader)
/// refuses it as truncated. What follows the marker (a phone's second picture, a trailer) is not read.
fn jpeg_is_whole(data: &[u8]) -> bool {
    let byte = |i: usize| data.get(i).copied();
    if !data.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut i = 2;
    loop {
        // The next marker: 0xFF, any fill 0xFFs, then its code (bytes between segments are skipped,
        // as libjpeg skips them with a warning).
        while byte(i).is_some_and(|b| b != 0xFF) {
            i += 1;
        }
        while byte(i) == Some(0xFF) {
            i += 1;
        }
        let Some(code) = byte(i) else {
            return false;
        };
        i += 1;
        match code {
            0xD9 => return true,
            // Restart markers and TEM carry no length, and 0xFF 0x00 is no marker (libjpeg reads
            // on after either, as after fill bytes before a restart marker inside a scan).
            0x00 | 0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(hi), Some(lo)) = (byte(i), byte(i + 1)) else {
            return false;
        };
        i += (hi as usize) << 8 | lo as usize;
        if code == 0xDA {
            // Entropy-coded data: a 0xFF in it is followed by 0x00 (a stuffed byte) or a restart
            // marker; anything else is the next marker.
            loop {
                match (byte(i), byte(i + 1)) {
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => i += 2,
                    // A fill byte before a marker.
                    (Some(0xFF), Some(0xFF)) => i += 1,
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => i += 1,
                    (None, _) => return false,
                }
            }
        }
    }
}

/// The most an image may take decoded: an 8K photograph at 16 bits per RGBA channel is 0.5 GiB.
const MAX_DECODED_BYTES: u64 = 1 << 30;

/// An image decoded, resized to cover its bucket (Lanczos) and centre-cropped to it: RGB in [0, 1],
/// channels first [3, height, width], with its (width, height).
pub fn load_pixels(path: &Path, resolution: usize) -> Result<(Vec<f32>, usize, usize)> {
    let image = decode(path)?;
    let (w0, h0) = (image.width() as usize, image.height() as usize);
    if w0 < SIDE_MULTIPLE || h0 < SIDE_MULTIPLE {
        return Err(Error::Invalid(format!(
            "{}: {w0}x{h0} pixels, smaller than {SIDE_MULTIPLE} on a side",
            path.display()
        )));
    }
    let (w, h) = bucket(w0, h0, resolution);
    // The centre of the image that covers the bucket's aspect, cropped before resizing: a sliver
    // resized whole first would take memory for all of its length at the bucket's scale.
    let scale = (w as f64 / w0 as f64).max(h as f64 / h0 as f64);
    let (cw, ch) = (
        ((w as f64 / scale).round() as usize).clamp(1, w0),
        ((h as f64 / scale).round() as usize).clamp(1, h0),
    );
    let rgb = image.to_rgb8();
    drop(image);
    let kept = image::imageops::crop_imm(
        &rgb,
        ((w0 - cw) / 2) as u32,
        ((h0 - ch) / 2) as u32,
        cw as u32,
        ch as u32,
    );
    let resized = image::imageops::resize(
        &*kept,
        w as u32,
        h as u32,
        image::imageops::FilterType::Lanczos3,
    );
    Ok((channels_first(&resized), w, h))
}

/// The most pixels a reference image keeps (Flux2KleinPipeline's 1024²): a larger one is scaled down
/// to about this area.
pub const REFERENCE_MAX_AREA: usize = 1024 * 1024;

/// The size a `width` x `height` reference image is scaled to (the same where it is within
/// `max_area` pixels; sides truncated as the pipeline's int(side · scale)), and the multiples of 16
/// its centre is then cropped to. The pipeline's `max_area` is `REFERENCE_MAX_AREA`.
pub fn reference_sizes(
    width: usize,
    height: usize,
    max_area: usize,
) -> ((usize, usize), (usize, usize)) {
    let scaled = match width * height > max_area {
        true => {
            let scale = (max_area as f64 / (width * height) as f64).sqrt();
            (
                (width as f64 * scale) as usize,
                (height as f64 * scale) as usize,
            )
        }
        false => (width, height),
    };
    let cropped = (
        scaled.0 / SIDE_MULTIPLE * SIDE_MULTIPLE,
        scaled.1 / SIDE_MULTIPLE * SIDE_MULTIPLE,
    );
    (scaled, cropped)
}

/// A reference image for sampling as Flux2KleinPipeline prepares its `image=`: at least 64 pixels a
/// side and an aspect within 8:1 (else refused, as the pipeline refuses it), scaled down (Lanczos) to
/// about `max_area` pixels where larger (the pipeline's 1024², `REFERENCE_MAX_AREA`), then its centre
/// cropped to sides that are multiples of 16 (no other resizing): RGB in [0, 1], channels first, with
/// its (width, height).
pub fn load_reference(path: &Path, max_area: usize) -> Result<(Vec<f32>, usize, usize)> {
    let image = decode(path)?;
    let (w0, h0) = (image.width() as usize, image.height() as usize);
    check_reference_shape(path, (w0, h0))?;
    let ((sw, sh), (w, h)) = reference_sizes(w0, h0, max_area);
    let mut rgb = image.to_rgb8();
    drop(image);
    if (sw, sh) != (w0, h0) {
        rgb = image::imageops::resize(
            &rgb,
            sw as u32,
            sh as u32,
            image::imageops::FilterType::Lanczos3,
        );
    }
    let kept = image::imageops::crop_imm(
        &rgb,
        ((sw - w) / 2) as u32,
        ((sh - h) / 2) as u32,
        w as u32,
        h as u32,
    )
    .to_image();
    Ok((channels_first(&kept), w, h))
}

/// A control image and the (width, height) it is prepared to.
pub type ControlImage = (PathBuf, (usize, usize));

/// For each training image of `images`, its control image in each of `folders`: the file with its
/// name's stem and an image extension (any case), with the size it is prepared to, read off the
/// header (the EXIF orientation, which may swap the sides, changes neither the area nor the token
/// count), checked as `load_reference` checks it. A folder without one, or with two (`a.png` and
/// `a.jpg`), is an error naming both.
pub fn control_images(
    images: &[&Path],
    folders: &[PathBuf],
    max_area: usize,
) -> Result<Vec<Vec<ControlImage>>> {
    // Each folder listed once: its image files by stem.
    let listed = folders
        .iter()
        .map(|folder| {
            let entries = std::fs::read_dir(folder).map_err(|e| Error::io(folder, e))?;
            let mut by_stem: HashMap<OsString, Vec<PathBuf>> = HashMap::new();
            for entry in entries {
                let path = entry.map_err(|e| Error::io(folder, e))?.path();
                let is_image = path
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)));
                if let Some(stem) = path.file_stem().filter(|_| is_image && path.is_file()) {
                    by_stem.entry(stem.to_os_string()).or_default().push(path);
                }
            }
            Ok(by_stem)
        })
        .collect::<Result<Vec<_>>>()?;
    images
        .iter()
        .map(|image| control_images_of(image, folders, &listed, max_area))
        .collect()
}

/// `control_images` of one training image, from the folders' listings.
fn control_images_of(
    image: &Path,
    folders: &[PathBuf],
    listed: &[HashMap<OsString, Vec<PathBuf>>],
    max_area: usize,
) -> Result<Vec<ControlImage>> {
    let stem = image.file_stem().unwrap_or_default();
    folders
        .iter()
        .zip(listed)
        .map(|(folder, by_stem)| {
            let mut found = by_stem.get(stem).cloned().unwrap_or_default();
            found.sort();
            let path = match &found[..] {
                [one] => one.clone(),
                [] => {
                    return Err(Error::Invalid(format!(
                        "{}: no control image of the same name in {}",
                        image.display(),
                        folder.display()
                    )));
                }
                several => {
                    return Err(Error::Invalid(format!(
                        "{}: several control images of that name in {}: {}",
                        image.display(),
                        folder.display(),
                        several
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            };
            reference_image(path, max_area)
        })
        .collect()
}

/// A reference image's path with the size it is prepared at (at most about `max_area` pixels),
/// read off its header and checked as Flux2KleinPipeline checks references.
pub fn reference_image(path: PathBuf, max_area: usize) -> Result<ControlImage> {
    // The format from the content, as `decode` reads it: a PNG named .jpg is common.
    let (w, h) = image::ImageReader::open(&path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::io(&path, e))?
        .into_dimensions()
        .map_err(|e| Error::Invalid(format!("{}: not a readable image: {e}", path.display())))?;
    let (w, h) = (w as usize, h as usize);
    check_reference_shape(&path, (w, h))?;
    Ok((path, reference_sizes(w, h, max_area).1))
}

/// A reference image's least side and widest aspect, as Flux2KleinPipeline checks them.
fn check_reference_shape(path: &Path, (w, h): (usize, usize)) -> Result<()> {
    const MIN_SIDE: usize = 64;
    const MAX_ASPECT: f64 = 8.0;
    if w < MIN_SIDE || h < MIN_SIDE {
        return Err(Error::Invalid(format!(
            "{}: {w}x{h} pixels; a reference image needs at least {MIN_SIDE} on each side",
            path.display()
        )));
    }
    let aspect = (w as f64 / h as f64).max(h as f64 / w as f64);
    if aspect > MAX_ASPECT {
        return Err(Error::Invalid(format!(
            "{}: {w}x{h} pixels, an aspect of {aspect:.1}:1; a reference image may be at most \
             {MAX_ASPECT}:1",
            path.display()
        )));
    }
    Ok(())
}

/// RGB bytes as [3, height, width] in [0, 1].
fn channels_first(image: &image::RgbImage) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut pixels = vec![0f32; 3 * w * h];
    for (x, y, p) in image.enumerate_pixels() {
        let (x, y) = (x as usize, y as usize);
        for c in 0..3 {
            pixels[(c * h + y) * w + x] = p[c] as f32 / 255.0;
        }
    }
    pixels
}

/// Pixels channels first [channels, height, width] mirrored left to right (`--flip-x`).
pub fn mirror(pixels: &mut [f32], width: usize) {
    for row in pixels.chunks_exact_mut(width) {
        row.reverse();
    }
}

/// An image file decoded (PNG, JPEG, WebP, ...), its EXIF orientation applied; refused by name where
/// it is not a regular file, unreadable, a JPEG cut short, or too large to decode.
fn decode(path: &Path) -> Result<image::DynamicImage> {
    crate::fsutil::require_regular_file(path).map_err(|e| Error::io(path, e))?;
    let unreadable = |e: image::ImageError| {
        Error::Invalid(format!("{}: not a readable image: {e}", path.display()))
    };
    // The EXIF orientation (phones) is applied.
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let reader = image::ImageReader::new(std::io::Cursor::new(&data))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let format = reader.format();
    let mut decoder = reader.into_decoder().map_err(unreadable)?;
    if format == Some(image::ImageFormat::Jpeg) && !jpeg_is_whole(&data) {
        return Err(Error::Invalid(format!(
            "{}: not a readable image: the JPEG data ends before its end marker (a file cut short)",
            path.display()
        )));
    }
    // A header may claim any size, and decoders allocate the whole image before reading a pixel.
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    let decoded = image::ImageDecoder::total_bytes(&decoder);
    if decoded > MAX_DECODED_BYTES {
        return Err(Error::Invalid(format!(
            "{}: {w}x{h} pixels take {:.1} GiB decoded, beyond the {} GiB nibble decodes an image \
             into: scale it down",
            path.display(),
            decoded as f64 / (1u64 << 30) as f64,
            MAX_DECODED_BYTES >> 30
        )));
    }
    let orientation = image::ImageDecoder::orientation(&mut decoder).map_err(unreadable)?;
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(unreadable)?;
    image.apply_orientation(orientation);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference sizes as Flux2KleinPipeline computes them (values from its formula in Python:
    /// scale = sqrt(1024² / (w·h)) above 1024² pixels, int(side · scale), then // 16 · 16), and
    /// under a smaller cap (`--control-resolution 512`, 64).
    #[test]
    fn references_scale_to_about_a_megapixel_and_crop_to_sixteens() {
        for ((w, h), scaled, cropped) in [
            ((2000, 1500), (1182, 886), (1168, 880)),
            ((1500, 2000), (886, 1182), (880, 1168)),
            ((1025, 1024), (1024, 1023), (1024, 1008)),
            ((1024, 1024), (1024, 1024), (1024, 1024)),
            ((4000, 500), (2896, 362), (2896, 352)),
            ((76, 66), (76, 66), (64, 64)),
        ] {
            assert_eq!(
                reference_sizes(w, h, REFERENCE_MAX_AREA),
                (scaled, cropped),
                "{w}x{h}"
            );
        }
        assert_eq!(
            reference_sizes(2000, 1500, 512 * 512),
            ((591, 443), (576, 432))
        );
        assert_eq!(reference_sizes(80, 70, 64 * 64), ((68, 59), (64, 48)));
    }

    /// Marker segments as encoders write them, around scan data with stuffed bytes, restart markers
    /// after fill bytes, and an EXIF thumbnail whose own end marker sits inside an APP1 segment.
    #[test]
    fn a_jpeg_is_whole_up_to_its_end_marker_and_not_before() {
        let segment = |code: u8, body: &[u8]| {
            let mut s = vec![0xFF, code];
            s.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
            s.extend_from_slice(body);
            s
        };
        let thumbnail = [0xFF, 0xD8, 0xFF, 0xDA, 0x00, 0x02, 0x11, 0xFF, 0xD9];
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(segment(0xE1, &thumbnail));
        jpeg.extend(segment(0xDB, &[7; 65]));
        jpeg.extend(segment(0xC2, &[8; 15]));
        jpeg.extend(segment(0xDA, &[1, 2, 3, 4]));
        // Scan data: a stuffed 0xFF, fill bytes then a restart marker, another stuffed 0xFF.
        jpeg.extend([
            0x12, 0xFF, 0x00, 0x34, 0xFF, 0xFF, 0xD0, 0x56, 0xFF, 0x00, 0x78,
        ]);
        // A second scan of a progressive file, tables between.
        jpeg.extend(segment(0xC4, &[9; 20]));
        jpeg.extend(segment(0xDA, &[1, 2, 3, 4]));
        jpeg.extend([0x9A, 0xFF, 0x00, 0xBC]);
        let scans_end = jpeg.len();
        jpeg.extend([0xFF, 0xFF, 0xD9]);
        assert!(jpeg_is_whole(&jpeg));
        // What follows the end marker is not read.
        let mut trailer = jpeg.clone();
        trailer.extend([0xFF, 0xDA, 0x00]);
        assert!(jpeg_is_whole(&trailer));
        // Cut anywhere before the end marker, it is not whole.
        for cut in 0..scans_end + 2 {
            assert!(!jpeg_is_whole(&jpeg[..cut]), "cut at {cut}");
        }
    }

    #[test]
    fn buckets_keep_the_aspect_with_about_the_area_in_sides_of_16() {
        assert_eq!(bucket(1000, 1000, 512), (512, 512));
        let (w, h) = bucket(1920, 1080, 1024);
        assert_eq!((w % 16, h % 16), (0, 0));
        assert!((w as f64 / h as f64 - 16.0 / 9.0).abs() < 0.05, "{w}x{h}");
        assert!(
            w * h <= 1024 * 1024 && w * h > 1024 * 1024 * 9 / 10,
            "{w}x{h}"
        );
        // A sliver is cropped to 1:4.
        assert_eq!(bucket(10, 4000, 512), (256, 1024));
    }

    #[test]
    fn triggers_go_where_the_caption_says_or_first() {
        assert_eq!(with_trigger("a [trigger] dog", Some("sks")), "a sks dog");
        assert_eq!(with_trigger("a dog", Some("sks")), "sks, a dog");
        assert_eq!(with_trigger("", Some("sks")), "sks");
        assert_eq!(with_trigger("a dog", None), "a dog");
        assert_eq!(with_trigger("a [trigger] dog", None), "a dog");
    }
}
