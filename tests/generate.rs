//! Generation: decoding with the KV cache gives the same logits as the full forward, a cached
//! conversation continues as a fresh one would, and sampling follows the temperature / top-p
//! distribution.

mod common;

use common::{fixture, rel};
use nibble::cpu::{self, KvCache};
use nibble::generate::{self, Executor, Sampling};
use nibble::gpu::weights::{GpuLora, GpuModel};
use nibble::rng::Rng;

/// The fixtures decoded: every family's, and E2B's and the mixtures'.
fn decoded_families() -> Vec<&'static str> {
    let more = [
        "gemma4_e2b",
        "qwen3_moe",
        "mixtral",
        "qwen2_moe",
        "gpt_oss",
        "gemma4_moe",
    ];
    common::families().into_iter().chain(more).collect()
}

/// Also with a DoRA adapter, whose factors the first step keeps in the cache for the others.
#[test]
fn cached_decoding_matches_the_full_forward() {
    // gemma4_e2b: layers that read another layer's cache (and write the same keys into it again);
    // qwen3_moe, mixtral and qwen2_moe (a shared expert too), gpt_oss (attention sinks): each
    // token's experts chosen one token at a time, their pairs and the routers' adapted (PEFT adapts parameters without DoRA: the
    // plain adapter alone).
    for name in decoded_families() {
        let f = fixture(name, "nf4");
        cached_decoding_matches(&f, &f.adapter, name);
        if f.adapter.config.target_parameters.is_empty() {
            let dora = common::as_dora(&f.model, &f.adapter, 0.0);
            cached_decoding_matches(&f, &dora, name);
        }
    }
}

fn cached_decoding_matches(f: &common::Fixture, adapter: &nibble::lora::LoraAdapter, name: &str) {
    let ids = &f.seq.ids;
    let vocab = f.model.config.vocab_size;
    let full = cpu::logits(&f.model, Some(adapter), ids).unwrap();
    let mut cache = KvCache::new(&f.model);
    // A prefill of five tokens, then one token at a time.
    let first = cpu::decode(&f.model, Some(adapter), &mut cache, &ids[..5]).unwrap();
    let e = rel(&first, &full[4 * vocab..5 * vocab]);
    assert!(e < 1e-5, "{name}: prefill logits differ by {e:e}");
    for t in 5..ids.len() {
        let step = cpu::decode(&f.model, Some(adapter), &mut cache, &ids[t..t + 1]).unwrap();
        let e = rel(&step, &full[t * vocab..(t + 1) * vocab]);
        assert!(e < 1e-5, "{name}: position {t} differs by {e:e}");
    }
    assert_eq!(cache.len(), ids.len());
}

/// A conversation decoded turn by turn, the cache reused, continues as a fresh decoding of the whole
/// conversation would: on `executor`.
fn check_cached_conversation(f: &common::Fixture, executor: Executor) {
    let sampling = Sampling {
        temperature: 0.8,
        top_p: 0.9,
        repetition_penalty: 1.3,
        seed: 5,
        ..Sampling::default()
    };
    let run = |cache: &mut generate::Cache, cached: &mut Vec<u32>, prompt: &[u32]| {
        generate::generate(executor, cache, cached, prompt, 6, &[], &sampling, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap()
    };
    let turn1: Vec<u32> = f.seq.ids[..8].to_vec();
    let (mut cache, mut cached) = (executor.cache(), Vec::new());
    let answer = run(&mut cache, &mut cached, &turn1);
    // The next prompt repeats the conversation so far, with a different last token, and goes on.
    let mut turn2: Vec<u32> = turn1.iter().chain(&answer).copied().collect();
    turn2.pop();
    turn2.extend_from_slice(&f.seq.ids[8..12]);
    let continued = run(&mut cache, &mut cached, &turn2);
    let fresh = run(&mut executor.cache(), &mut Vec::new(), &turn2);
    assert_eq!(continued, fresh);
    assert_eq!(
        cached.len(),
        turn2.len() + continued.len() - 1,
        "the last token is not fed yet"
    );
}

#[test]
fn a_cached_conversation_continues_as_a_fresh_one() {
    let f = fixture("llama", "none");
    check_cached_conversation(
        &f,
        Executor::Cpu {
            model: &f.model,
            adapter: Some(&f.adapter),
        },
    );
}

/// Decoding on the GPU executor (lavapipe in CI) against the CPU's: the logits of a prefill and of 75
/// one-token steps (the GPU's cache grows past its first 64 positions), the same greedy continuation,
/// and a cached conversation. Measured: logits within 1.5e-6 (relative); held to 1.5e-5.
#[test]
fn gpu_decoding_matches_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    let mut worst = 0f64;
    for name in decoded_families() {
        let f = fixture(name, "nf4");
        let (gm, gl) = (
            GpuModel::upload(&gpu, &f.model).unwrap(),
            GpuLora::upload(&gpu, &f.adapter),
        );
        let on_cpu = Executor::Cpu {
            model: &f.model,
            adapter: Some(&f.adapter),
        };
        let on_gpu = Executor::Gpu {
            gpu: &gpu,
            model: &gm,
            lora: Some(&gl),
        };
        let vocab = f.model.config.vocab_size as u64;
        let mut rng = Rng::new(3);
        let ids: Vec<u32> = (0..80).map(|_| rng.below(vocab) as u32).collect();
        let (mut cpu_cache, mut gpu_cache) = (on_cpu.cache(), on_gpu.cache());
        let mut feeds = vec![&ids[..5]];
        feeds.extend(ids[5..].chunks(1));
        let mut settled = None;
        for (i, feed) in feeds.into_iter().enumerate() {
            let expected = pollster::block_on(on_cpu.decode(&mut cpu_cache, feed)).unwrap();
            let got = pollster::block_on(on_gpu.decode(&mut gpu_cache, feed)).unwrap();
            let e = rel(&got, &expected);
            assert!(e < 1.5e-5, "{name}: step {i}: GPU logits differ by {e:e}");
            worst = worst.max(e);
            if i == 8 {
                settled = Some(gpu.scratch_bytes());
            }
        }
        // Once the first one-token steps have settled the pool (measured: it grows at steps 1
        // and 2, a mixture's up to step 5, whose small temporaries' homes take the idle buffers of
        // the logits read back until the pool holds one of each), decoding allocates nothing more:
        // the attention statistics, which grow a position at a time, are planned for 256 positions
        // at a time.
        assert_eq!(
            Some(gpu.scratch_bytes()),
            settled,
            "{name}: decoding allocated"
        );
        let greedy = |executor| generate::greedy(executor, &ids[..6], 24, &[]).unwrap();
        assert_eq!(
            greedy(on_gpu),
            greedy(on_cpu),
            "{name}: greedy continuations differ"
        );
        check_cached_conversation(&f, on_gpu);
    }
    eprintln!("worst GPU decoding logits: {worst:.1e}");
    // DoRA: the factors the first step keeps in the device's cache, through a conversation.
    let f = fixture("qwen2", "nf4");
    let dora = common::as_dora(&f.model, &f.adapter, 0.0);
    let (gm, gl) = (
        GpuModel::upload(&gpu, &f.model).unwrap(),
        GpuLora::upload(&gpu, &dora),
    );
    let on_cpu = Executor::Cpu {
        model: &f.model,
        adapter: Some(&dora),
    };
    let on_gpu = Executor::Gpu {
        gpu: &gpu,
        model: &gm,
        lora: Some(&gl),
    };
    let ids = &f.seq.ids;
    let (mut cpu_cache, mut gpu_cache) = (on_cpu.cache(), on_gpu.cache());
    for feed in [&ids[..5], &ids[5..6], &ids[6..7]] {
        let expected = pollster::block_on(on_cpu.decode(&mut cpu_cache, feed)).unwrap();
        let got = pollster::block_on(on_gpu.decode(&mut gpu_cache, feed)).unwrap();
        let e = rel(&got, &expected);
        assert!(e < 1.5e-5, "DoRA: GPU logits differ by {e:e}");
    }
    check_cached_conversation(&f, on_gpu);
}

/// The distribution sampled from is transformers' after its logits processors (repetition penalty,
/// temperature, top-k, top-p, min-p; scripts/make_sampling_fixture.py, 18 random cases over six
/// settings, Qwen2.5-Instruct's among them): the same tokens kept, the same probabilities (measured
/// 7e-8, held to 1e-6); greedy picks after the penalty too; a generation_config.json's settings
/// resolve with transformers' defaults.
#[test]
fn sampling_gives_the_distribution_transformers_samples_from() {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("tests/fixtures/sampling.json").unwrap())
            .unwrap();
    let mut worst = 0f64;
    for case in fixture["cases"].as_array().unwrap() {
        let c = &case["config"];
        let number =
            |key: &str, default: f64| c.get(key).and_then(|v| v.as_f64()).unwrap_or(default);
        let sampling = Sampling {
            temperature: number("temperature", 1.0) as f32,
            top_k: number("top_k", 0.0) as usize,
            top_p: number("top_p", 1.0) as f32,
            min_p: number("min_p", 0.0) as f32,
            repetition_penalty: number("repetition_penalty", 1.0) as f32,
            seed: 0,
        };
        let logits: Vec<f32> = serde_json::from_value(case["logits"].clone()).unwrap();
        let context: Vec<u32> = serde_json::from_value(case["context"].clone()).unwrap();
        let probs: Vec<f64> = serde_json::from_value(case["probs"].clone()).unwrap();
        let ours = generate::distribution(&logits, &sampling, &context);
        let mut kept: Vec<u32> = ours.iter().map(|&(id, _)| id).collect();
        kept.sort_unstable();
        let theirs: Vec<u32> = (0..probs.len() as u32)
            .filter(|&i| probs[i as usize] > 0.0)
            .collect();
        assert_eq!(kept, theirs, "{c}: tokens kept");
        for &(id, p) in &ours {
            worst = worst.max((p - probs[id as usize]).abs());
        }
        let greedy = Sampling {
            temperature: 0.0,
            ..sampling
        };
        let mut rng = Rng::new(0);
        let pick = generate::sample(&logits, &greedy, &context, &mut rng);
        assert_eq!(pick as u64, case["greedy"].as_u64().unwrap(), "{c}: greedy");
    }
    assert!(worst < 1e-6, "probabilities differ by {worst:e}");

    let defaults = &fixture["defaults"];
    let sampled = Sampling::of_generation_config(&serde_json::json!({"do_sample": true})).unwrap();
    assert_eq!(
        sampled.temperature as f64,
        defaults["temperature"].as_f64().unwrap()
    );
    assert_eq!(sampled.top_k as u64, defaults["top_k"].as_u64().unwrap());
    assert_eq!(sampled.top_p as f64, defaults["top_p"].as_f64().unwrap());
    let qwen = serde_json::json!({"do_sample": true, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
        "repetition_penalty": 1.05, "bos_token_id": 151643});
    let qwen = Sampling::of_generation_config(&qwen).unwrap();
    assert_eq!((qwen.temperature, qwen.top_k, qwen.top_p), (0.7, 20, 0.8));
    assert_eq!(qwen.repetition_penalty, 1.05);
    // Without do_sample, transformers decodes greedily whatever the temperature, with the penalty.
    let greedy = serde_json::json!({"temperature": 0.7, "repetition_penalty": 1.2});
    let greedy = Sampling::of_generation_config(&greedy).unwrap();
    assert_eq!((greedy.temperature, greedy.repetition_penalty), (0.0, 1.2));
    // Its sampling settings stay for a --temperature that asks for sampling, as transformers'
    // generate(do_sample=True) keeps the config's.
    let kept =
        Sampling::of_generation_config(&serde_json::json!({"top_k": 20, "top_p": 0.8})).unwrap();
    assert_eq!((kept.temperature, kept.top_k, kept.top_p), (0.0, 20, 0.8));
    for bad in [
        serde_json::json!({"do_sample": "yes"}),
        serde_json::json!({"do_sample": true, "top_p": 1.5}),
        serde_json::json!({"repetition_penalty": -1}),
        serde_json::json!({"do_sample": true, "temperature": "hot"}),
        serde_json::json!({"do_sample": true, "top_k": -5}),
        serde_json::json!({"do_sample": true, "top_k": 2.5}),
        serde_json::json!([]),
        serde_json::json!({"do_sample": true, "temperature": 0}),
    ] {
        assert!(Sampling::of_generation_config(&bad).is_err(), "{bad}");
    }
}

#[test]
fn sampling_follows_temperature_and_top_p() {
    let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0];
    let mut rng = Rng::new(1);
    assert_eq!(
        generate::sample(&logits, &Sampling::default(), &[], &mut rng),
        3
    );
    let tiny_p = Sampling {
        temperature: 1.0,
        top_p: 1e-6,
        ..Sampling::default()
    };
    assert!((0..50).all(|_| generate::sample(&logits, &tiny_p, &[], &mut rng) == 3));
    // Temperature 2 over all tokens: frequencies follow softmax(logits / 2) (4 standard deviations).
    let t = Sampling {
        temperature: 2.0,
        top_p: 1.0,
        ..Sampling::default()
    };
    let draws = 40_000;
    let mut counts = [0usize; 5];
    for _ in 0..draws {
        counts[generate::sample(&logits, &t, &[], &mut rng) as usize] += 1;
    }
    let z: f64 = logits.iter().map(|&l| (l as f64 / 2.0).exp()).sum();
    for (i, &l) in logits.iter().enumerate() {
        let p = (l as f64 / 2.0).exp() / z;
        let sigma = (p * (1.0 - p) / draws as f64).sqrt();
        let got = counts[i] as f64 / draws as f64;
        assert!((got - p).abs() < 4.0 * sigma, "token {i}: {got} vs {p}");
    }
    // top_p 0.8 keeps the smallest set reaching 80%: tokens 3 (62%) and 1 (23%).
    let nucleus = Sampling {
        temperature: 1.0,
        top_p: 0.8,
        ..Sampling::default()
    };
    let mut seen = [false; 5];
    for _ in 0..2000 {
        seen[generate::sample(&logits, &nucleus, &[], &mut rng) as usize] = true;
    }
    assert_eq!(seen, [false, true, false, true, false]);
    // top_p 0 keeps the most likely token alone, as transformers does (its minimum of one token).
    let top = Sampling {
        top_p: 0.0,
        ..nucleus
    };
    let distribution = generate::distribution(&logits, &top, &[]);
    assert_eq!(distribution, vec![(3, 1.0)]);
}

/// LongRoPE (Phi-3): once a decoding step's positions pass the original length (16 in the fixture),
/// its long factors apply to every position, so the cached keys (rotated with the short ones) are fed
/// again, as transformers' Phi-3 drops its cache there. Decoding one token at a time across that point
/// then gives the full forward's logits at each length; keeping the cache would not.
#[test]
fn longrope_decoding_refeeds_the_cache_where_the_long_factors_begin() {
    let f = fixture("phi3", "nf4");
    let vocab = f.model.config.vocab_size;
    let ids: Vec<u32> = f.seq.ids.iter().chain(&f.seq.ids[..6]).copied().collect();
    let executor = Executor::Cpu {
        model: &f.model,
        adapter: Some(&f.adapter),
    };
    let (mut cache, mut cached) = (executor.cache(), Vec::new());
    let mut naive = KvCache::new(&f.model);
    cpu::decode(&f.model, Some(&f.adapter), &mut naive, &ids[..10]).unwrap();
    pollster::block_on(executor.decode_after(&mut cache, &mut cached, &ids[..10])).unwrap();
    let mut naive_worst = 0f64;
    for t in 10..ids.len() {
        let step =
            pollster::block_on(executor.decode_after(&mut cache, &mut cached, &ids[t..t + 1]))
                .unwrap();
        let full = cpu::logits(&f.model, Some(&f.adapter), &ids[..=t]).unwrap();
        let last = &full[t * vocab..(t + 1) * vocab];
        let e = rel(&step, last);
        assert!(e < 1e-5, "position {t} differs by {e:e}");
        let kept = cpu::decode(&f.model, Some(&f.adapter), &mut naive, &ids[t..t + 1]).unwrap();
        naive_worst = naive_worst.max(rel(&kept, last));
    }
    assert_eq!(cached, ids);
    assert!(
        naive_worst > 1e-3,
        "the short-factor keys should matter: {naive_worst:e}"
    );
    // A new prompt that shares the first 10 tokens but stays below the switch reuses none of the
    // cache (whose keys are long-factor ones): its logits are the short-factor forward's.
    let prompt = &ids[..12];
    assert_eq!(executor.reuse(&mut cache, &mut cached, prompt), 0);
    let logits =
        pollster::block_on(executor.decode_after(&mut cache, &mut cached, prompt)).unwrap();
    let full = cpu::logits(&f.model, Some(&f.adapter), prompt).unwrap();
    let e = rel(&logits, &full[11 * vocab..]);
    assert!(e < 1e-5, "after the prompt shrank: {e:e}");
}

/// Answers stop at the special token the chat template closes an assistant turn with, also where the
/// template is one given in place of the model's and that token is none nibble knows by name.
#[test]
fn answers_stop_at_the_templates_end_of_turn_token() {
    use nibble::tokenizer::{ChatTokenizer, TemplateChoice};
    let tok = ChatTokenizer::from_files(
        &nibble::synth::qwen25_tokenizer(),
        std::path::Path::new("qwen"),
    )
    .unwrap();
    let known = generate::stop_tokens(&tok);
    let box_end = tok.token_id("<|box_end|>").unwrap();
    assert!(!known.contains(&box_end));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("boxed.jinja");
    std::fs::write(
        &file,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}<|box_end|>\n{% endfor %}",
    )
    .unwrap();
    let tok = tok
        .with_template(&TemplateChoice::read(&file).unwrap())
        .unwrap();
    let stop = generate::stop_tokens(&tok);
    assert!(stop.contains(&box_end), "{stop:?}");
    assert_eq!(stop.len(), known.len() + 1);
}
