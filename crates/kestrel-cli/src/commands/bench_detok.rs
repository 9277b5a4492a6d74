//! `kestrel bench-detok`: the streaming detokenizer (`StreamDecoder`, what
//! the engine runs per request) against naive per-token decoding (decode the
//! whole prefix after every token and send the new suffix, what a simple
//! server does), on token sequences of a multilingual text and on seeded
//! random sequences rich in byte-fallback tokens (characters split over
//! several tokens, and invalid bytes).
//!
//! Both methods are also checked: their concatenated output must equal
//! `Tokenizer::decode` of the whole sequence. A stream mismatch is a bug in
//! the streaming decoder and makes the command fail.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use kestrel_bench::{capsule, Better, Row, Stats};
use kestrel_formats::ModelFile;
use kestrel_tokenizer::{StreamDecoder, TokenKind, Tokenizer};
use serde::Serialize;
use serde_json::json;

use crate::{loading, model_path};

#[derive(ClapArgs, Clone, Debug)]
pub struct Args {
    /// Model whose tokenizer is measured (only the tokenizer is loaded).
    pub model: Option<PathBuf>,
    /// Text to tokenize instead of the built-in multilingual text.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Number of random token sequences.
    #[arg(long, default_value_t = 16)]
    pub random: usize,
    /// Tokens per random sequence.
    #[arg(long, default_value_t = 256)]
    pub random_len: usize,
    /// Seed of the random sequences.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, short = 'r', default_value_t = 5)]
    pub runs: usize,
    /// Write the capsule here (default: benchmarks/<time>-bench-detok-cpu.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the result as one JSON document on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Several scripts and emoji (with skin tones, ZWJ sequences and flags), so
/// that tokens split characters and byte-fallback tokens appear.
const BUILTIN_TEXT: &str = "\
The kestrel hovers over the field, wings beating fast, head perfectly still.\n\
Le faucon crécerelle plane au-dessus du pré ; déjà, l'œil aiguisé repère un campagnol.\n\
Der Turmfalke rüttelt über der Wiese – größer als gedacht, äußerst geschickt.\n\
El cernícalo vuela sobre el campo: ¿quién lo verá caer? ¡Qué rápido!\n\
Пустельга зависает над полем и высматривает добычу.\n\
紅隼在田野上空盤旋，尋找田鼠。チョウゲンボウは野原の上でホバリングする。황조롱이가 들판 위를 맴돈다.\n\
ἡ κεγχρηΐς · العوسق يحوم فوق الحقل · बाज़ खेत के ऊपर मंडराता है\n\
Emoji: 🦅🐭🌾 👍🏽 👩‍💻 🏳️‍🌈 🇫🇷🇯🇵 ✨ — rare: 𓅃 𝕂𝕖𝕤𝕥𝕣𝕖𝕝 ⅞ ∮ ℏ\n\
fn main() { println!(\"{:?}\", vec![1, 2, 3]); } // code, too\n";

/// One sequence's measurements.
#[derive(Clone, Debug, Serialize)]
struct SeqResult {
    name: String,
    tokens: usize,
    byte_tokens: usize,
    /// Median over runs of the stream's time per token.
    stream_ns_per_token: f64,
    naive_ns_per_token: f64,
    stream_matches: bool,
    naive_matches: bool,
}

/// splitmix64: a tiny seeded generator, enough to pick token ids.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The byte-fallback token of each byte value, where the vocabulary has one.
fn byte_tokens(tok: &Tokenizer) -> Vec<Option<u32>> {
    let mut table = vec![None; 256];
    for id in 0..tok.vocab_size() as u32 {
        if tok.token_kind(id) == Some(TokenKind::Byte) {
            if let Some(&[b]) = tok.token_bytes(id) {
                table[b as usize].get_or_insert(id);
            }
        }
    }
    table
}

/// A random sequence mixing ordinary ids, random characters spelled as
/// byte tokens (valid UTF-8 split across tokens) and lone random bytes
/// (mostly invalid UTF-8).
fn random_sequence(rng: &mut SplitMix, tok: &Tokenizer, bytes: &[Option<u32>], len: usize) -> Vec<u32> {
    let has_bytes = bytes.iter().any(Option::is_some);
    let vocab = tok.vocab_size();
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let pick = if has_bytes { rng.below(10) } else { 0 };
        match pick {
            // A character outside ASCII, as its UTF-8 bytes.
            6..=8 => {
                let c = loop {
                    let cp = (0x80 + rng.below(0x1_0000 - 0x80)) as u32;
                    let cp = if rng.below(4) == 0 { cp + 0x1_0000 } else { cp };
                    if let Some(c) = char::from_u32(cp) {
                        break c;
                    }
                };
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    if let Some(id) = bytes[b as usize] {
                        out.push(id);
                    }
                }
            }
            9 => {
                if let Some(id) = bytes[rng.below(256)] {
                    out.push(id);
                }
            }
            _ => out.push(rng.below(vocab) as u32),
        }
    }
    out.truncate(len);
    out
}

/// The streaming decoder over `ids`: the full output text.
fn stream_decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    let mut d = StreamDecoder::new(tok);
    let mut out = String::new();
    for &id in ids {
        out.push_str(&d.push(id)?);
    }
    out.push_str(&d.flush());
    Ok(out)
}

/// Naive streaming: after each token, decode the whole prefix and send what
/// was not sent yet; hold back while the text ends in U+FFFD (an unfinished
/// character) or does not extend what was sent; send the rest at the end.
fn naive_decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    let mut sent = String::new();
    for i in 1..=ids.len() {
        let text = tok.decode(&ids[..i])?;
        if text.ends_with(char::REPLACEMENT_CHARACTER) || !text.starts_with(sent.as_str()) {
            continue;
        }
        let new = &text[sent.len()..];
        sent.push_str(new);
    }
    let text = tok.decode(ids)?;
    if let Some(rest) = text.strip_prefix(sent.as_str()) {
        sent.push_str(rest);
    }
    Ok(sent)
}

/// Median nanoseconds per token of `f` over `runs` repetitions.
fn time_per_token(
    runs: usize,
    ids: &[u32],
    mut f: impl FnMut() -> Result<String>,
) -> Result<(f64, Vec<f64>)> {
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        black_box(f()?);
        samples.push(t0.elapsed().as_nanos() as f64 / ids.len().max(1) as f64);
    }
    Ok((Stats::of(&samples).median, samples))
}

/// Microseconds to create one decoder (averaged over many).
fn creation_us(tok: &Tokenizer, runs: usize) -> Vec<f64> {
    const N: usize = 100_000;
    (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..N {
                black_box(StreamDecoder::new(black_box(tok)));
            }
            t0.elapsed().as_secs_f64() * 1e6 / N as f64
        })
        .collect()
}

pub fn main(a: Args) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs is 0, expected at least 1");
    }
    let path = model_path::resolve(a.model.clone())?;
    let file = ModelFile::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let tok = loading::tokenizer_for(&file).with_context(|| format!("tokenizer of {}", path.display()))?;
    let (text_name, text) = match &a.file {
        Some(f) => (
            f.display().to_string(),
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        ),
        None => ("multilingual".to_string(), BUILTIN_TEXT.to_string()),
    };
    let mut seqs: Vec<(String, Vec<u32>)> = Vec::new();
    let text_ids = tok.encode(&text, tok.add_bos_default())?;
    if text_ids.is_empty() {
        bail!("the text of {text_name} encodes to no tokens");
    }
    seqs.push((format!("text:{text_name}"), text_ids));
    let bytes = byte_tokens(&tok);
    let mut rng = SplitMix(a.seed);
    for i in 0..a.random {
        seqs.push((
            format!("random:{i}"),
            random_sequence(&mut rng, &tok, &bytes, a.random_len.max(1)),
        ));
    }

    let mut results = Vec::new();
    let mut raw_stream: Vec<Vec<f64>> = Vec::new();
    let mut raw_naive: Vec<Vec<f64>> = Vec::new();
    for (name, ids) in &seqs {
        let full = tok.decode(ids)?;
        let stream_matches = stream_decode(&tok, ids)? == full;
        let naive_matches = naive_decode(&tok, ids)? == full;
        let (s, sr) = time_per_token(a.runs, ids, || stream_decode(&tok, ids))?;
        let (n, nr) = time_per_token(a.runs, ids, || naive_decode(&tok, ids))?;
        raw_stream.push(sr);
        raw_naive.push(nr);
        results.push(SeqResult {
            name: name.clone(),
            tokens: ids.len(),
            byte_tokens: ids
                .iter()
                .filter(|&&t| tok.token_kind(t) == Some(TokenKind::Byte))
                .count(),
            stream_ns_per_token: s,
            naive_ns_per_token: n,
            stream_matches,
            naive_matches,
        });
    }
    let create = creation_us(&tok, a.runs);

    // Rows: the text sequence alone, and the random ones pooled (per run,
    // total time over total tokens).
    let pooled = |raw: &[Vec<f64>], range: std::ops::Range<usize>| -> Vec<f64> {
        (0..a.runs)
            .map(|r| {
                let (mut ns, mut n) = (0.0, 0usize);
                for i in range.clone() {
                    ns += raw[i][r] * results[i].tokens as f64;
                    n += results[i].tokens;
                }
                ns / n.max(1) as f64
            })
            .collect()
    };
    let mut rows = Vec::new();
    let mut summary = Vec::new();
    let groups = [("text", 0..1), ("random", 1..seqs.len())];
    for (group, range) in groups {
        if range.is_empty() {
            continue;
        }
        let tokens: usize = results[range.clone()].iter().map(|r| r.tokens).sum();
        let stream = pooled(&raw_stream, range.clone());
        let naive = pooled(&raw_naive, range.clone());
        let (sm, nm) = (Stats::of(&stream).median, Stats::of(&naive).median);
        let speedup = if sm > 0.0 { nm / sm } else { 0.0 };
        let seq_len = tokens as f64 / range.len() as f64;
        rows.push(
            Row::new(group, "stream_ns_per_token", "ns", Better::Lower, stream)
                .with_param("seq_len", seq_len),
        );
        rows.push(
            Row::new(group, "naive_ns_per_token", "ns", Better::Lower, naive).with_param("seq_len", seq_len),
        );
        rows.push(
            Row::new(group, "speedup", "x", Better::Higher, vec![speedup]).with_param("seq_len", seq_len),
        );
        summary.push(json!({
            "group": group, "sequences": range.len(), "tokens": tokens,
            "stream_ns_per_token": sm, "naive_ns_per_token": nm, "speedup": speedup,
        }));
    }
    let create_median = Stats::of(&create).median;
    rows.push(Row::new("decoder", "create_us", "us", Better::Lower, create));
    let stream_mismatches: Vec<&str> = results
        .iter()
        .filter(|r| !r.stream_matches)
        .map(|r| r.name.as_str())
        .collect();
    let naive_mismatches = results.iter().filter(|r| !r.naive_matches).count();

    let result = json!({
        "kind": "bench-detok",
        "device": "cpu",
        "tokenizer": tok.origin().display().to_string(),
        "vocab_size": tok.vocab_size(),
        "byte_fallback_tokens": bytes.iter().filter(|b| b.is_some()).count(),
        "seed": a.seed,
        "runs": a.runs,
        "sequences": results,
        "summary": summary,
        "create_us": create_median,
        "stream_mismatches": stream_mismatches.len(),
        "naive_mismatches": naive_mismatches,
        "rows": rows,
    });

    let mut t = format!(
        "bench-detok: {} ({} ids, {} byte tokens), {} sequences, median of {} runs\n",
        path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        tok.vocab_size(),
        bytes.iter().filter(|b| b.is_some()).count(),
        results.len(),
        a.runs
    );
    t.push_str(&format!(
        "{:<8} {:>5} {:>8} {:>16} {:>16} {:>9}\n",
        "input", "seqs", "tokens", "stream ns/token", "naive ns/token", "speedup"
    ));
    for s in &summary {
        t.push_str(&format!(
            "{:<8} {:>5} {:>8} {:>16.1} {:>16.1} {:>8.1}x\n",
            s["group"].as_str().unwrap_or(""),
            s["sequences"].as_u64().unwrap_or(0),
            s["tokens"].as_u64().unwrap_or(0),
            s["stream_ns_per_token"].as_f64().unwrap_or(0.0),
            s["naive_ns_per_token"].as_f64().unwrap_or(0.0),
            s["speedup"].as_f64().unwrap_or(0.0)
        ));
    }
    t.push_str(&format!("decoder creation: {create_median:.4} us\n"));
    t.push_str(&format!(
        "checked against decode(): stream {} mismatch(es){}, naive {} mismatch(es)\n",
        stream_mismatches.len(),
        if stream_mismatches.is_empty() {
            String::new()
        } else {
            format!(" ({})", stream_mismatches.join(", "))
        },
        naive_mismatches
    ));
    if a.json {
        eprint!("{t}");
    } else {
        print!("{t}");
    }
    let cap = capsule::write(&result, Some(&path), a.out.as_deref(), "bench-detok")?;
    eprintln!("capsule: {}", cap.display());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    if !stream_mismatches.is_empty() {
        bail!(
            "the streaming decoder's output differs from decode() on {} sequence(s): {}",
            stream_mismatches.len(),
            stream_mismatches.join(", ")
        );
    }
    Ok(())
}
