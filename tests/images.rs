//! Image folders for FLUX.2 LoRAs: captions beside images, trigger words, aspect buckets, and the
//! errors a user sees for a missing caption, a corrupt file or a tiny image.

use nibble::images::{bucket, load_pixels, scan_folder};
use nibble::rng::Rng;

/// A random RGB image of `w` x `h` saved as `name` (the format by its extension).
fn write_image(dir: &std::path::Path, name: &str, (w, h): (u32, u32), rng: &mut Rng) {
    let image = image::RgbImage::from_fn(w, h, |_, _| {
        image::Rgb([0, 0, 0].map(|_: u8| rng.below(256) as u8))
    });
    image.save(dir.join(name)).unwrap();
}

#[test]
fn a_folder_of_captioned_images_loads_into_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    write_image(dir.path(), "b.png", (300, 200), &mut rng);
    write_image(dir.path(), "a.jpg", (64, 96), &mut rng);
    std::fs::write(dir.path().join("a.txt"), "a [trigger] on a hill\n").unwrap();
    std::fs::write(dir.path().join("b.txt"), "").unwrap();
    std::fs::write(dir.path().join("notes.md"), "not an image").unwrap();
    let examples = scan_folder(dir.path(), (Some("sks"), None)).unwrap();
    let captions: Vec<&str> = examples.iter().map(|e| e.caption.as_str()).collect();
    assert_eq!(captions, ["a sks on a hill", "sks"]);
    let (pixels, w, h) = load_pixels(&examples[1].image, 128).unwrap();
    assert_eq!((w, h), bucket(300, 200, 128));
    assert_eq!((w % 16, h % 16), (0, 0));
    assert_eq!(pixels.len(), 3 * w * h);
    assert!(pixels.iter().all(|p| (0.0..=1.0).contains(p)));
    let mean = pixels.iter().sum::<f32>() / pixels.len() as f32;
    assert!((mean - 0.5).abs() < 0.1, "random pixels average {mean}");
}

#[test]
fn missing_captions_corrupt_and_tiny_images_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(4);
    write_image(dir.path(), "lonely.png", (32, 32), &mut rng);
    let e = scan_folder(dir.path(), (None, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lonely.png") && e.contains("no caption") && e.contains("--default-caption"),
        "{e}"
    );
    // ai-toolkit's `default_caption`: for a missing caption and in place of an empty one, the
    // trigger word put in as into any caption; a caption written keeps its text.
    write_image(dir.path(), "empty.png", (32, 32), &mut rng);
    std::fs::write(dir.path().join("empty.txt"), " \n").unwrap();
    write_image(dir.path(), "own.png", (32, 32), &mut rng);
    std::fs::write(dir.path().join("own.txt"), "a red fox").unwrap();
    let captions = |trigger, default| -> Vec<String> {
        scan_folder(dir.path(), (trigger, default))
            .unwrap()
            .into_iter()
            .map(|e| e.caption)
            .collect()
    };
    assert_eq!(
        captions(None, Some("a photo")),
        ["a photo", "a photo", "a red fox"]
    );
    assert_eq!(
        captions(Some("sks"), Some("")),
        ["sks", "sks", "sks, a red fox"]
    );
    for name in ["empty.png", "empty.txt", "own.png", "own.txt"] {
        std::fs::remove_file(dir.path().join(name)).unwrap();
    }

    std::fs::write(dir.path().join("lonely.txt"), "x").unwrap();
    std::fs::write(
        dir.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    std::fs::write(dir.path().join("broken.txt"), "y").unwrap();
    write_image(dir.path(), "tiny.png", (8, 40), &mut rng);
    std::fs::write(dir.path().join("tiny.txt"), "z").unwrap();
    let examples = scan_folder(dir.path(), (None, None)).unwrap();
    assert_eq!(examples.len(), 3);
    let e = load_pixels(&dir.path().join("broken.png"), 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("broken.png") && e.contains("not a readable image"),
        "{e}"
    );
    let e = load_pixels(&dir.path().join("tiny.png"), 64)
        .unwrap_err()
        .to_string();
    assert!(e.contains("tiny.png") && e.contains("8x40"), "{e}");
    // A header claiming 100,000 x 100,000 pixels (30 GB decoded) over a few bytes of data: refused
    // before the decoder allocates.
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut c = (data.len() as u32).to_be_bytes().to_vec();
        c.extend_from_slice(kind);
        c.extend_from_slice(data);
        let crc = crc32(&c[4..]);
        c.extend_from_slice(&crc.to_be_bytes());
        c
    };
    let mut header = 100_000u32.to_be_bytes().repeat(2);
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &header));
    png.extend(chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    png.extend(chunk(b"IEND", &[]));
    std::fs::write(dir.path().join("huge.png"), png).unwrap();
    let e = load_pixels(&dir.path().join("huge.png"), 64)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("huge.png") && e.contains("100000x100000") && e.contains("scale it down"),
        "{e}"
    );
    let empty = tempfile::tempdir().unwrap();
    let e = scan_folder(empty.path(), (None, None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no images"), "{e}");
}

#[cfg(unix)]
#[test]
fn an_image_that_is_a_fifo_is_refused_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("skipping: mkfifo is not available");
        return;
    }
    let e = load_pixels(&fifo, 64).unwrap_err().to_string();
    assert!(e.contains("pipe.png"), "{e}");
}

#[test]
fn a_jpeg_cut_short_is_refused_and_one_with_a_trailer_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(6);
    write_image(dir.path(), "whole.jpg", (64, 48), &mut rng);
    let data = std::fs::read(dir.path().join("whole.jpg")).unwrap();
    // Cut inside the picture's data, at a few places.
    for (i, cut) in [data.len() / 2, data.len() - 3, 700]
        .into_iter()
        .enumerate()
    {
        let name = format!("cut{i}.jpg");
        std::fs::write(dir.path().join(&name), &data[..cut]).unwrap();
        let e = load_pixels(&dir.path().join(&name), 64)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&name) && e.contains("cut short"), "{e}");
    }
    // Bytes after the end marker (a phone's trailer, here with marker-like bytes) are not read.
    let mut trailer = data.clone();
    trailer.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x10, 1, 2, 3]);
    std::fs::write(dir.path().join("trailer.jpg"), &trailer).unwrap();
    let (whole, w, h) = load_pixels(&dir.path().join("whole.jpg"), 64).unwrap();
    let (with_trailer, ..) = load_pixels(&dir.path().join("trailer.jpg"), 64).unwrap();
    assert_eq!((w, h), bucket(64, 48, 64));
    assert_eq!(whole, with_trailer);
}

#[test]
fn a_sliver_is_cropped_to_its_bucket_around_its_centre() {
    let dir = tempfile::tempdir().unwrap();
    // 16 x 4000: dark above the middle, light below it, with noise.
    let mut rng = Rng::new(7);
    let image = image::RgbImage::from_fn(16, 4000, |_, y| {
        let base = if y < 2000 { 20 } else { 220 };
        image::Rgb([0, 0, 0].map(|_: u8| base + rng.below(16) as u8))
    });
    image.save(dir.path().join("sliver.png")).unwrap();
    let (pixels, w, h) = load_pixels(&dir.path().join("sliver.png"), 256).unwrap();
    assert_eq!((w, h), bucket(16, 4000, 256));
    assert_eq!(h, 4 * w, "the bucket keeps at most 1:4");
    // The centre 1:4 of the sliver: its top half dark, its bottom half light.
    let row_mean = |y: usize| (0..w).map(|x| pixels[y * w + x]).sum::<f32>() / w as f32;
    assert!(
        row_mean(2) < 0.2 && row_mean(h - 3) > 0.8,
        "{} {}",
        row_mean(2),
        row_mean(h - 3)
    );
    assert!(row_mean(h / 2 - 8) < 0.2 && row_mean(h / 2 + 8) > 0.8);
}

#[test]
fn captions_as_windows_and_cameras_write_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(8);
    write_image(dir.path(), "a.png", (32, 32), &mut rng);
    write_image(dir.path(), "B.JPG", (32, 32), &mut rng);
    // A byte-order mark and CRLF (Notepad), and a caption named in capitals.
    std::fs::write(dir.path().join("a.txt"), "\u{feff}a red fox\r\n").unwrap();
    std::fs::write(dir.path().join("B.TXT"), "snow").unwrap();
    // macOS's resource files beside the images are no images.
    std::fs::write(dir.path().join("._a.png"), b"\x00\x05\x16\x07").unwrap();
    let examples = scan_folder(dir.path(), (Some(" sks "), None)).unwrap();
    let found: Vec<(String, &str)> = examples
        .iter()
        .map(|e| {
            (
                e.image.file_name().unwrap().to_string_lossy().into_owned(),
                e.caption.as_str(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("B.JPG".to_string(), "sks, snow"),
            ("a.png".to_string(), "sks, a red fox")
        ]
    );
    let e = scan_folder(dir.path(), (Some("  "), None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--trigger is empty"), "{e}");
    // A caption that is not text is named as such, not as missing.
    std::fs::write(dir.path().join("a.txt"), b"caf\xe9").unwrap();
    let e = scan_folder(dir.path(), (None, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a.txt") && e.contains("cannot be read") && !e.contains("no caption"),
        "{e}"
    );
    // A folder of folders (kohya's `10_name/`) says they are not read.
    let outer = tempfile::tempdir().unwrap();
    std::fs::create_dir(outer.path().join("10_fox")).unwrap();
    let e = scan_folder(outer.path(), (None, None))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no images") && e.contains("folders inside it are not read"),
        "{e}"
    );
}

/// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xEDB8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// `--flip-x`'s mirror: pixel (c, y, x) of the mirrored image is (c, y, width - 1 - x) of the
/// original, channels first.
#[test]
fn mirrored_pixels_swap_left_and_right() {
    let (w, h) = (5, 3);
    let at = |c: usize, y: usize, x: usize| (c * 100 + y * 10 + x) as f32;
    let mut pixels: Vec<f32> = (0..3)
        .flat_map(|c| (0..h).flat_map(move |y| (0..w).map(move |x| at(c, y, x))))
        .collect();
    nibble::images::mirror(&mut pixels, w);
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                assert_eq!(pixels[(c * h + y) * w + x], at(c, y, w - 1 - x));
            }
        }
    }
}
