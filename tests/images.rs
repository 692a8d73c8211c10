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
    let examples = scan_folder(dir.path(), Some("sks")).unwrap();
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
    let e = scan_folder(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("lonely.png") && e.contains("no caption"), "{e}");

    std::fs::write(dir.path().join("lonely.txt"), "x").unwrap();
    std::fs::write(
        dir.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    std::fs::write(dir.path().join("broken.txt"), "y").unwrap();
    write_image(dir.path(), "tiny.png", (8, 40), &mut rng);
    std::fs::write(dir.path().join("tiny.txt"), "z").unwrap();
    let examples = scan_folder(dir.path(), None).unwrap();
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
    let empty = tempfile::tempdir().unwrap();
    let e = scan_folder(empty.path(), None).unwrap_err().to_string();
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
