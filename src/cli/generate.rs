//! `nibble generate` and `nibble chat`: a model (and adapter) answering, token by token.

use anyhow::{Result, bail};
use nibble::exec::Device;
use nibble::generate::Placed;
use nibble::tokenizer::{ChatTokenizer, Message, TemplateArgs};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{QuantArgs, SAME_INTERRUPTION, open_placed};

/// Whether `chat` is writing an answer (Ctrl-C at a terminal then stops the answer, not the session).
static ANSWERING: AtomicBool = AtomicBool::new(false);
/// Set by Ctrl-C during an answer: the answer ends after the token being computed.
static STOP_ANSWER: AtomicBool = AtomicBool::new(false);

/// What `generate` and `chat` share: the model, an adapter, and how to pick tokens.
#[derive(clap::Args)]
pub struct GenArgs {
    /// The model: a Hugging Face folder (config.json, safetensors, tokenizer) or a file written by
    /// `nibble quantize`.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[command(flatten)]
    quant: QuantArgs,
    /// The most tokens an answer runs to (it ends earlier at the model's end of turn).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy; above 0 samples [default: as transformers' `generate` does with the model's
    /// generation_config.json (its do_sample and temperature), else greedy].
    #[arg(long, allow_hyphen_values = true)]
    temperature: Option<f32>,
    /// When sampling, sample among the K most likely tokens only (0: all) [default: the model's
    /// generation_config.json, else transformers' 50].
    #[arg(long, allow_hyphen_values = true)]
    top_k: Option<usize>,
    /// When sampling, sample from the smallest set of tokens whose probabilities sum to this (1:
    /// every token) [default: the model's generation_config.json, else 1].
    #[arg(long, allow_hyphen_values = true)]
    top_p: Option<f32>,
    /// When sampling, drop tokens less likely than this times the most likely one (0: none)
    /// [default: the model's generation_config.json, else 0].
    #[arg(long, allow_hyphen_values = true)]
    min_p: Option<f32>,
    /// Divide the logits of tokens already in the conversation by this (multiply negative ones; 1:
    /// none), greedy or not [default: the model's generation_config.json, else 1].
    #[arg(long, allow_hyphen_values = true)]
    repetition_penalty: Option<f32>,
    /// Seeds the sampling (with a temperature above 0).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    seed: u64,
    /// Where decoding runs: `auto` takes a real GPU when one is present.
    #[arg(long, value_enum, ignore_case = true, default_value = "auto")]
    device: Device,
    /// A JSON file with the functions the model may call (a list of schemas, as a dataset row's `tools`),
    /// rendered into the prompt by the chat template.
    #[arg(long)]
    tools: Option<PathBuf>,
    /// The chat template to render the conversation with (as `nibble train --chat-template`)
    /// [default: the adapter's chat_template.jinja where it keeps one, else the model's].
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Keywords for the chat template as a JSON object, as a dataset row's `chat_template_kwargs`
    /// (`{"enable_thinking": false}` for Qwen3).
    #[arg(long)]
    chat_template_kwargs: Option<String>,
}

impl GenArgs {
    /// How tokens are picked: the model's generation_config.json as transformers reads it, under
    /// the options given (a temperature above 0 samples even where the model's config does not).
    fn sampling(&self) -> Result<(nibble::generate::Sampling, Vec<u32>)> {
        use nibble::generate::Sampling;
        let source = nibble::model::open(&self.model)?;
        let config_path = source.generation_config.as_ref().map(|(_, path)| path);
        // The ids generation_config.json ends text at (Llama 3.1's <|eom_id|> among them), which
        // transformers stops at too.
        let mut eos: Vec<u32> = Vec::new();
        let mut sampling = match &source.generation_config {
            Some((Err(e), _)) => anyhow::bail!("{e}"),
            Some((Ok(text), path)) => {
                let config: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
                eos = match config.get("eos_token_id") {
                    Some(serde_json::Value::Array(ids)) => ids.iter().collect(),
                    Some(one) => vec![one],
                    None => Vec::new(),
                }
                .into_iter()
                .filter(|id| !id.is_null())
                .map(|id| {
                    id.as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "{}: `eos_token_id` {id} is not a token id",
                                path.display()
                            )
                        })
                })
                .collect::<Result<_>>()?;
                let unapplied = Sampling::unapplied(&config);
                if !unapplied.is_empty() {
                    log::warn!(
                        "{}: nibble decodes without {} (transformers' generate would apply them)",
                        path.display(),
                        unapplied.join(", ")
                    );
                }
                Sampling::of_generation_config(&config)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            }
            None => Sampling::default(),
        };
        // The options that only sampling reads come after the temperature.
        let options = [
            (self.temperature.is_some(), "--temperature"),
            (self.top_k.is_some(), "--top-k"),
            (self.top_p.is_some(), "--top-p"),
            (self.min_p.is_some(), "--min-p"),
        ];
        let any_given =
            self.repetition_penalty.is_some() || options.iter().any(|(given, _)| *given);
        sampling.temperature = self.temperature.unwrap_or(sampling.temperature);
        sampling.top_k = self.top_k.unwrap_or(sampling.top_k);
        sampling.top_p = self.top_p.unwrap_or(sampling.top_p);
        sampling.min_p = self.min_p.unwrap_or(sampling.min_p);
        sampling.repetition_penalty = self
            .repetition_penalty
            .unwrap_or(sampling.repetition_penalty);
        sampling.seed = self.seed;
        sampling.check().map_err(|e| anyhow::anyhow!("--{e}"))?;
        let origin = match (config_path, any_given) {
            (Some(path), false) => format!("as {} says", path.display()),
            (Some(path), true) => format!("{}, under the options given", path.display()),
            (None, true) => "the options given".into(),
            (None, false) => "the model has no generation_config.json".into(),
        };
        log::info!("decoding: {} ({origin})", sampling.describe());
        if sampling.temperature == 0.0
            && let Some((_, flag)) = options[1..].iter().find(|(given, _)| *given)
        {
            log::warn!("{flag} applies when sampling (a --temperature above 0); decoding greedily");
        }
        Ok((sampling, eos))
    }

    /// The tools and keywords the prompt is rendered with; errors name the file or the option.
    fn template_args(&self) -> Result<TemplateArgs> {
        let tools = match &self.tools {
            None => None,
            Some(path) => {
                let text = nibble::fsutil::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let tools: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", path.display()))?;
                if !tools.is_array() {
                    bail!("{}: expected a list of function schemas", path.display());
                }
                Some(tools)
            }
        };
        let kwargs = match &self.chat_template_kwargs {
            None => serde_json::Map::new(),
            Some(text) => match serde_json::from_str(text) {
                Ok(serde_json::Value::Object(kwargs)) => kwargs,
                _ => bail!(
                    "--chat-template-kwargs must be a JSON object, such as '{{\"enable_thinking\": false}}'"
                ),
            },
        };
        Ok(TemplateArgs { tools, kwargs })
    }
}

/// Answer one prompt (as a user turn through the chat template, or raw text with --raw).
#[derive(clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    generation: GenArgs,
    /// The user's message (with --raw, the text to continue).
    #[arg(long)]
    prompt: String,
    /// A system message before the prompt.
    #[arg(long)]
    system: Option<String>,
    /// Continue the prompt text as it is, without the chat template.
    #[arg(long)]
    raw: bool,
}

/// Talk with a model in the terminal: each line is a user turn (/reset starts over, /quit or end of
/// input quits, /help lists these). The KV cache carries the conversation from turn to turn.
#[derive(clap::Args)]
pub struct ChatArgs {
    #[command(flatten)]
    generation: GenArgs,
    /// A system message that opens the conversation (kept by /reset).
    #[arg(long)]
    system: Option<String>,
}

/// A model ready to generate: weights and adapter where decoding runs, tokenizer, stop tokens and
/// sampling options.
struct Speaker {
    placed: Placed,
    tok: ChatTokenizer,
    stop: Vec<u32>,
    sampling: nibble::generate::Sampling,
    max_new: usize,
    cache: nibble::generate::Cache,
    cached: Vec<u32>,
    template_args: TemplateArgs,
    /// Whether a conversation past the model's positions was warned about already.
    warned_positions: bool,
}

impl Speaker {
    fn open(g: &GenArgs) -> Result<Self> {
        let (sampling, eos) = g.sampling()?;
        let template_args = g.template_args()?;
        let (tok, placed) = open_placed(
            &g.model,
            g.quant,
            g.adapter.as_deref(),
            g.chat_template.as_deref(),
            g.device,
        )?;
        let executor = placed.executor();
        log::info!("generating on {}", executor.describe());
        let cache = executor.cache();
        Ok(Speaker {
            stop: {
                let mut stop = nibble::generate::stop_tokens(&tok);
                stop.extend(eos);
                stop.sort_unstable();
                stop.dedup();
                stop
            },
            cache,
            placed,
            tok,
            sampling,
            max_new: g.max_new_tokens,
            cached: Vec::new(),
            template_args,
            warned_positions: false,
        })
    }

    /// The conversation through the chat template, ready for the model's turn.
    fn prompt(&self, messages: &[Message]) -> Result<String> {
        Ok(self
            .tok
            .apply_chat_template_with(messages, true, &self.template_args)?)
    }

    /// Generates after `text`, printing the answer as it comes; returns it (without the stop token).
    fn answer(&mut self, text: &str) -> Result<String> {
        let prompt = self.tok.encode(text)?;
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        // transformers warns alike: past its trained positions a model's text degrades.
        let positions = self.placed.model.config.trained_positions();
        if prompt.len() + self.max_new > positions && !self.warned_positions {
            self.warned_positions = true;
            log::warn!(
                "the prompt ({} tokens) and up to --max-new-tokens {} reach past the {positions} \
                 positions the model was trained to place: what comes after them is unreliable",
                prompt.len(),
                self.max_new
            );
        }
        let mut answer: Vec<u32> = Vec::new();
        let mut printed = 0;
        let (tok, stop) = (&self.tok, &self.stop);
        let mut out = std::io::stdout();
        let mut failure = None;
        let started = std::time::Instant::now();
        let mut first_token_after = None;
        let mut generated = 0usize;
        // The prompt tokens the cache already holds (earlier turns of a chat) are not fed again.
        let reused = nibble::generate::reusable_prefix(&self.cached, &prompt);
        let sampling = self.sampling.clone();
        // Each turn of a chat draws from a stream of its own, so that asking again (after /reset, say)
        // samples anew; the same --seed still replays the same conversation.
        // (An LCG step: seeds a splitmix increment apart would give overlapping generator states.)
        self.sampling.seed = (self.sampling.seed)
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        nibble::generate::generate(
            self.placed.executor(),
            &mut self.cache,
            &mut self.cached,
            &prompt,
            self.max_new,
            stop,
            &sampling,
            |t| {
                use std::io::Write;
                generated += 1;
                first_token_after.get_or_insert_with(|| started.elapsed());
                if STOP_ANSWER.load(Ordering::SeqCst) {
                    return ControlFlow::Break(());
                }
                if stop.contains(&t) {
                    return ControlFlow::Continue(());
                }
                answer.push(t);
                // Decode the whole answer so far: a character may span several tokens.
                match tok.decode(&answer) {
                    Ok(text) if text.len() > printed && !text.ends_with('\u{FFFD}') => {
                        let _ = write!(out, "{}", &text[printed..]);
                        let _ = out.flush();
                        printed = text.len();
                    }
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
                ControlFlow::Continue(())
            },
        )?;
        if let Some(e) = failure {
            return Err(e.into());
        }
        // The answer's end and its newline before the statistics' line, which would run into it on
        // a terminal showing both.
        let text = self.tok.decode(&answer)?;
        println!("{}", text.get(printed..).unwrap_or(""));
        if let Some(first) = first_token_after {
            let rest = started.elapsed().saturating_sub(first).as_secs_f64();
            let fed = prompt.len() - reused;
            log::info!(
                "{generated} tokens: the first after {:.2} s ({fed} prompt tokens fed), then {:.1} tokens/s",
                first.as_secs_f64(),
                if rest > 0.0 {
                    (generated - 1) as f64 / rest
                } else {
                    0.0
                },
            );
        }
        Ok(text)
    }
}

fn with_system(system: Option<&str>) -> Vec<Message> {
    system
        .map(|s| Message::new("system", s))
        .into_iter()
        .collect()
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let (prompt, system) = (args.prompt.as_str(), args.system.as_deref());
    if args.raw {
        let g = &args.generation;
        let templated = [
            ("system", system.is_some()),
            ("tools", g.tools.is_some()),
            ("chat-template-kwargs", g.chat_template_kwargs.is_some()),
        ];
        if let Some((name, _)) = templated.iter().find(|(_, given)| *given) {
            anyhow::bail!(
                "--{name} goes into the chat template's prompt, which --raw does not use"
            );
        }
    }
    let mut speaker = Speaker::open(&args.generation)?;
    let text = if args.raw {
        prompt.to_string()
    } else {
        let mut messages = with_system(system);
        messages.push(Message::new("user", prompt));
        speaker.prompt(&messages)?
    };
    speaker.answer(&text)?;
    Ok(())
}

const CHAT_HELP: &str =
    "/reset starts over, /quit or end of input quits, Ctrl-C stops an answer, /help repeats this";

/// Ctrl-C at a terminal while an answer is written stops the answer and returns to the prompt, as
/// chat programs do; at the prompt, a second time during an answer, or with input from a pipe or a
/// file (a script, which `timeout` or a supervisor stops by signal), it ends the session with exit
/// status 130.
fn stop_answers_on_signals() {
    use std::io::IsTerminal;
    let interactive = std::io::stdin().is_terminal();
    let mut last: Option<std::time::Instant> = None;
    let installed = ctrlc::set_handler(move || {
        if last.is_some_and(|at| at.elapsed() < SAME_INTERRUPTION) {
            return;
        }
        last = Some(std::time::Instant::now());
        if interactive
            && ANSWERING.load(Ordering::SeqCst)
            && !STOP_ANSWER.swap(true, Ordering::SeqCst)
        {
            // Seen at once, even while a long prompt is still being read.
            eprint!(" (stopping)");
            return;
        }
        eprintln!();
        std::process::exit(130);
    });
    if let Err(e) = installed {
        log::warn!("cannot catch Ctrl-C ({e}): it will end the session, not the answer");
        return;
    }
    // The handler catches SIGTERM and SIGHUP too (ctrlc's `termination`, which training needs);
    // here they end the process, as before, rather than an answer.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for signal in [libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: signal(2) with SIG_DFL only restores the default disposition of a signal this
        // process handles through ctrlc's handler; no Rust code runs in signal context.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
}

/// What a line typed into `chat` asks for.
#[derive(Debug, PartialEq)]
enum ChatLine {
    /// A user turn for the model.
    Turn,
    /// Nothing to send (empty).
    Skip,
    Quit,
    Reset,
    /// A reply of nibble's own, not the model's.
    Say(String),
}

/// Commands (`/...`) and what a terminal sends for keys the line editor lacks (arrow keys arrive as
/// escape sequences) are nibble's to handle; everything else is a turn.
fn chat_command(line: &str) -> ChatLine {
    if line.is_empty() {
        return ChatLine::Skip;
    }
    if line.contains('\u{1b}') {
        return ChatLine::Say(
            "(that line held terminal escape codes, from arrow or function keys; it was not sent)"
                .into(),
        );
    }
    match line {
        "/quit" | "/exit" | "/q" => ChatLine::Quit,
        "/reset" | "/clear" => ChatLine::Reset,
        "/help" | "/?" => ChatLine::Say(CHAT_HELP.into()),
        other if other.starts_with('/') && !other.contains(' ') => {
            ChatLine::Say(format!("unknown command {other}: {CHAT_HELP}"))
        }
        _ => ChatLine::Turn,
    }
}

pub fn chat(args: ChatArgs) -> Result<()> {
    use std::io::{BufRead, Write};
    let (g, system) = (&args.generation, args.system.as_deref());
    let mut speaker = Speaker::open(g)?;
    // Refused before the first line is typed, not after.
    if speaker.tok.template_for(&speaker.template_args).is_err() {
        bail!(
            "{}: chat renders each turn through one; give it with --chat-template FILE.jinja \
             (`nibble generate --raw` continues plain text without one)",
            speaker.tok.missing_template()
        );
    }
    let mut messages = with_system(system);
    stop_answers_on_signals();
    eprintln!("chatting with {} ({CHAT_HELP})", g.model.display());
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let _ = std::io::stderr().flush();
        let mut bytes = Vec::new();
        if stdin.lock().read_until(b'\n', &mut bytes)? == 0 {
            return Ok(());
        }
        // One line a terminal or a pipe mangled is that line's problem, not the conversation's.
        let Ok(line) = String::from_utf8(bytes) else {
            eprintln!("that line is not UTF-8 text; type it again");
            continue;
        };
        let line = line.trim();
        match chat_command(line) {
            ChatLine::Skip => continue,
            ChatLine::Quit => return Ok(()),
            ChatLine::Reset => {
                messages = with_system(system);
                continue;
            }
            ChatLine::Say(reply) => {
                eprintln!("{reply}");
                continue;
            }
            ChatLine::Turn => {}
        }
        messages.push(Message::new("user", line));
        let text = speaker.prompt(&messages)?;
        STOP_ANSWER.store(false, Ordering::SeqCst);
        ANSWERING.store(true, Ordering::SeqCst);
        let answer = speaker.answer(&text);
        ANSWERING.store(false, Ordering::SeqCst);
        let answer = answer?;
        if STOP_ANSWER.load(Ordering::SeqCst) {
            if answer.is_empty() {
                // Nothing of the answer was written: the question goes, as if never asked.
                eprintln!("(stopped before the answer began; Ctrl-C at the prompt quits)");
                messages.pop();
                continue;
            }
            eprintln!(
                "(stopped; the conversation keeps what was written; Ctrl-C at the prompt quits)"
            );
        }
        messages.push(Message::new("assistant", &answer));
    }
}

#[cfg(test)]
mod tests {
    use super::{ChatLine, chat_command};

    #[test]
    fn commands_and_escape_codes_never_reach_the_model() {
        assert_eq!(chat_command(""), ChatLine::Skip);
        assert_eq!(chat_command("/quit"), ChatLine::Quit);
        assert_eq!(chat_command("/reset"), ChatLine::Reset);
        assert!(matches!(chat_command("/help"), ChatLine::Say(s) if s.contains("/reset")));
        assert!(
            matches!(chat_command("/nope"), ChatLine::Say(s) if s.contains("unknown command /nope"))
        );
        assert!(matches!(chat_command("hello\u{1b}[A"), ChatLine::Say(_)));
        assert_eq!(chat_command("What is 2/3?"), ChatLine::Turn);
        assert_eq!(
            chat_command("/usr/bin is a path, not a command"),
            ChatLine::Turn
        );
    }
}
