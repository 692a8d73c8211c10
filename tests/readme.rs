//! The README's five-minute walkthrough, run as written (issue 19): the shell block between
//! `<!-- walkthrough -->` and `<!-- /walkthrough -->`, with `nibble` on the PATH, in a fresh folder. It
//! must succeed line by line, and the answers it promises must come out: the trained ones from the
//! adapter, through `chat`, and from the merged model.
#![cfg(unix)]

#[test]
fn the_readme_walkthrough_runs_as_written() {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- walkthrough -->")
        .expect("the walkthrough's start marker");
    let end = readme
        .find("<!-- /walkthrough -->")
        .expect("its end marker");
    let block = &readme[start..end];
    let code = block
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.rsplit_once("```"))
        .map(|(code, _)| code)
        .expect("a ```sh block between the markers");
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_nibble"), bin.join("nibble")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", code])
        .current_dir(dir.path())
        .env("PATH", path)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let answers: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("A QLoRA") || l.starts_with("On GPUs"))
        .collect();
    assert_eq!(
        answers,
        [
            "A QLoRA trainer written in Rust.",
            "On GPUs, in browsers and on CPUs.",
            "A QLoRA trainer written in Rust.",
        ],
        "{stdout}"
    );
    for made in ["my-run/adapter_model.safetensors", "my-merged/config.json"] {
        assert!(dir.path().join(made).is_file(), "{made}");
    }
}
