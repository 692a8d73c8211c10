//! Which tokens carry loss equals what TRL's SFTTrainer trains on (tests/fixtures/sft_labels.json, read
//! off its data collator by scripts/make_sft_labels_fixture.py): conversations through chat templates
//! with `{% generation %}` blocks under --loss-on assistant (TRL's assistant_only_loss), conversational
//! prompt/completion rows, and text rows, whose text and completions end with the eos token; rows cut
//! to --max-length keeping their start or end (TRL's truncation_mode), those left with no token that
//! carries loss left out as TRL leaves them out; text in another column (dataset_text_field); another
//! eos token (TRL's eos_token).

use nibble::synth::qwen25_tokenizer;
use nibble::tokenizer::{ChatTokenizer, TemplateChoice};
use nibble::train::{Cut, LossOn, TrainConfig, Truncation, tokenize_cut};
use std::path::Path;

#[derive(serde::Deserialize)]
struct Case {
    row: serde_json::Value,
    /// None where TRL drops the row: no token of it is left to carry loss.
    ids: Option<Vec<u32>>,
    labels: Option<Vec<bool>>,
}

#[derive(serde::Deserialize)]
struct Group {
    chat_template: Option<String>,
    /// The tokenizer adds a BOS token before a text (`with_bos`).
    #[serde(default)]
    bos: bool,
    loss_on: String,
    max_length: Option<usize>,
    truncation_mode: Option<String>,
    text_field: Option<String>,
    /// TRL's eos_token, in place of the tokenizer's.
    eos_token: Option<String>,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    groups: Vec<Group>,
}

fn fixtures() -> String {
    format!("{}/tests/fixtures", env!("CARGO_MANIFEST_DIR"))
}

/// Qwen2.5's tokenizer made to add <|endoftext|> before a text, as Llama's adds its BOS (the same edit
/// as scripts/make_sft_labels_fixture.py's).
fn with_bos(files: &mut nibble::model::TokenizerFiles) {
    let mut tok: serde_json::Value =
        serde_json::from_str(files.tokenizer_json.as_deref().unwrap()).unwrap();
    let bos = |type_id: u32| serde_json::json!({"SpecialToken": {"id": "<|endoftext|>", "type_id": type_id}});
    let seq =
        |id: &str, type_id: u32| serde_json::json!({"Sequence": {"id": id, "type_id": type_id}});
    tok["post_processor"] = serde_json::json!({"type": "Sequence", "processors": [
        tok["post_processor"].clone(),
        {"type": "TemplateProcessing", "single": [bos(0), seq("A", 0)],
         "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}}]});
    files.tokenizer_json = Some(tok.to_string());
}

fn tokenizer(template: Option<&str>, bos: bool) -> ChatTokenizer {
    let mut files = qwen25_tokenizer();
    if bos {
        with_bos(&mut files);
    }
    let tok = ChatTokenizer::from_files(&files, Path::new("assets/qwen2.5-tokenizer")).unwrap();
    match template {
        Some(name) => {
            let path = format!("{}/generation_marks/{name}.jinja", fixtures());
            tok.with_template(&TemplateChoice::read(Path::new(&path)).unwrap())
                .unwrap()
        }
        None => tok,
    }
}

#[test]
fn tokens_carrying_loss_equal_trl_sft_trainers() {
    let text = std::fs::read_to_string(format!("{}/sft_labels.json", fixtures())).unwrap();
    let fixture: Fixture = serde_json::from_str(&text).unwrap();
    let mut checked = 0;
    for group in &fixture.groups {
        let tok = tokenizer(group.chat_template.as_deref(), group.bos);
        let tok = match &group.eos_token {
            Some(eos) => tok.with_eos_token(eos).unwrap(),
            None => tok,
        };
        let loss_on = match group.loss_on.as_str() {
            "assistant" => LossOn::Assistant,
            _ => LossOn::Default,
        };
        let keep = match group.truncation_mode.as_deref() {
            Some("keep_end") => Truncation::KeepEnd,
            _ => Truncation::KeepStart,
        };
        let cut = Cut {
            max_length: group.max_length.unwrap_or(4096),
            keep,
        };
        let text_field = group.text_field.as_deref().unwrap_or("text");
        let mut rows = Vec::new();
        for (i, case) in group.cases.iter().enumerate() {
            let what = format!("{:?} {cut:?} case {i}: {}", group.chat_template, case.row);
            let line = case.row.to_string();
            let examples = nibble::data::parse_jsonl_with(&line, "fixture", text_field).unwrap();
            let (seq, removed) = tokenize_cut(&tok, &examples[0], loss_on, cut).unwrap();
            assert!(seq.ids.len() <= cut.max_length);
            if removed > 0 {
                assert_eq!(seq.ids.len(), cut.max_length, "{what}");
            }
            let carries: Vec<bool> = seq.targets.iter().map(Option::is_some).collect();
            let (Some(ids), Some(labels)) = (&case.ids, &case.labels) else {
                assert!(removed > 0, "{what}: TRL dropped it uncut");
                assert!(!carries.contains(&true), "{what}: TRL left no label");
                rows.push(examples[0].clone());
                continue;
            };
            assert_eq!(&seq.ids, ids, "{what}: token ids differ");
            // Position t predicts token t + 1: it carries loss where TRL labels that token (the first
            // token's label is never used by a causal loss).
            let expected: Vec<bool> = labels[1..].iter().copied().chain([false]).collect();
            assert_eq!(carries, expected, "{what}: tokens carrying loss differ");
            assert!(carries.iter().any(|&c| c));
            if group.max_length.is_none() {
                assert!(carries.iter().any(|&c| !c));
            }
            rows.push(examples[0].clone());
            checked += 1;
        }
        // A run keeps the rows TRL keeps, in their order.
        let config = TrainConfig {
            loss_on,
            max_length: cut.max_length,
            truncation: keep,
            ..Default::default()
        };
        let kept =
            nibble::train::run::tokenize_examples(&tok, &rows, &config, "fixture", false).unwrap();
        let expected: Vec<&Vec<u32>> = group.cases.iter().filter_map(|c| c.ids.as_ref()).collect();
        assert_eq!(kept.iter().map(|s| &s.ids).collect::<Vec<_>>(), expected);
    }
    assert_eq!(checked, 51);
    // A token the vocabulary lacks is refused, as TRL refuses it.
    let err = tokenizer(None, false)
        .with_eos_token("<|not a token|>")
        .err()
        .unwrap();
    assert!(err.to_string().contains("<|not a token|>"), "{err}");
}

/// --packing puts the same examples together as TRL's SFTTrainer packs them (best fit decreasing within
/// each batch of 1,000 rows; tests/fixtures/packing_bfd.json from scripts/make_packing_fixture.py), in
/// the same order within each packed sequence.
#[test]
fn packing_groups_examples_as_trl_does() {
    #[derive(serde::Deserialize)]
    struct Packing {
        seq_length: usize,
        lengths: Vec<usize>,
        bins: Vec<Vec<u32>>,
    }
    let text = std::fs::read_to_string(format!("{}/packing_bfd.json", fixtures())).unwrap();
    let fixture: Packing = serde_json::from_str(&text).unwrap();
    assert!(fixture.lengths.len() > 2000);
    // Each example's tokens are its index.
    let examples: Vec<nibble::cpu::Sequence> = fixture
        .lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| nibble::cpu::Sequence::all_tokens(vec![i as u32; n]))
        .collect();
    let packed = nibble::cpu::pack(examples, fixture.seq_length);
    let bins: Vec<Vec<u32>> = packed
        .iter()
        .map(|seq| seq.starts.iter().map(|&s| seq.ids[s as usize]).collect())
        .collect();
    assert_eq!(bins.len(), fixture.bins.len());
    assert_eq!(bins, fixture.bins);
    assert!(packed.iter().all(|s| s.ids.len() <= fixture.seq_length));
}

/// --packing-strategy bfd, bfd_split and wrapped give the rows TRL's SFTTrainer trains on
/// (tests/fixtures/packing_strategies.json from scripts/make_packing_fixture.py): over 1,100 examples
/// longer and shorter than the sequence length, some of them starting with tokens that carry no loss
/// (a prompt), the same tokens in each row, the same examples (or pieces) in it, and the same tokens
/// carrying loss.
#[test]
fn packing_strategies_give_trls_rows() {
    use nibble::cpu::{PackingStrategy, Sequence, pack_with};
    #[derive(serde::Deserialize)]
    struct Row {
        runs: Vec<[u32; 3]>,
        seq_lengths: Option<Vec<u32>>,
        labelled: String,
    }
    #[derive(serde::Deserialize)]
    struct Strategies {
        seq_length: usize,
        lengths: Vec<u32>,
        prompts: Vec<usize>,
        strategies: std::collections::BTreeMap<String, Vec<Row>>,
    }
    let text = std::fs::read_to_string(format!("{}/packing_strategies.json", fixtures())).unwrap();
    let fixture: Strategies = serde_json::from_str(&text).unwrap();
    // Token j of example i is i·1000 + j; the first `prompts[i]` tokens carry no label.
    let examples: Vec<Sequence> = fixture
        .lengths
        .iter()
        .zip(&fixture.prompts)
        .enumerate()
        .map(|(i, (&n, &prompt))| {
            let mut s = Sequence::all_tokens((0..n).map(|j| i as u32 * 1000 + j).collect());
            for t in 0..s.targets.len() {
                if t + 1 < prompt {
                    s.targets[t] = None;
                }
            }
            s.first_labelled = prompt == 0;
            s
        })
        .collect();
    assert!(examples.len() > 1000 && examples.iter().any(|s| s.ids.len() > fixture.seq_length));
    for (name, rows) in &fixture.strategies {
        let strategy = <PackingStrategy as clap::ValueEnum>::from_str(name, false).unwrap();
        let packed = pack_with(examples.clone(), fixture.seq_length, strategy);
        assert_eq!(packed.len(), rows.len(), "{name}: rows");
        for (k, (ours, theirs)) in packed.iter().zip(rows).enumerate() {
            let ids: Vec<u32> = theirs
                .runs
                .iter()
                .flat_map(|&[i, j, n]| (j..j + n).map(move |j| i * 1000 + j))
                .collect();
            assert_eq!(ours.ids, ids, "{name} row {k}: tokens");
            let starts: Vec<u32> = match &theirs.seq_lengths {
                Some(lengths) => lengths
                    .iter()
                    .scan(0, |at, &n| {
                        let start = *at;
                        *at += n;
                        Some(start)
                    })
                    .collect(),
                None => vec![0],
            };
            assert_eq!(ours.starts, starts, "{name} row {k}: examples");
            // Position t predicts token t + 1 where TRL labels it.
            let labelled: Vec<bool> = theirs.labelled.chars().map(|c| c == '1').collect();
            let expected: Vec<bool> = labelled[1..].iter().copied().chain([false]).collect();
            let carries: Vec<bool> = ours.targets.iter().map(Option::is_some).collect();
            assert_eq!(carries, expected, "{name} row {k}: tokens carrying loss");
            for (t, target) in ours.targets.iter().enumerate() {
                assert!(target.is_none_or(|id| id == ours.ids[t + 1]));
            }
        }
    }
}
