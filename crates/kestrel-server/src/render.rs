//! Response bodies and stream chunks in OpenAI's JSON shapes.

use kestrel_engine::{FinishReason, Usage};
use kestrel_tokenizer::Tokenizer;
use serde_json::{json, Value};

/// Which endpoint a response belongs to: the shapes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// One generated token as the server keeps it for logprobs.
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// Totals over a request's choices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub prompt: usize,
    pub completion: usize,
    pub cached: usize,
}

pub fn usage(t: Totals) -> Value {
    json!({
        "prompt_tokens": t.prompt,
        "completion_tokens": t.completion,
        "total_tokens": t.prompt + t.completion,
        "prompt_tokens_details": { "cached_tokens": t.cached },
    })
}

/// Sums usage over choices: each prompt's tokens count once however many
/// choices it has; its cached tokens are the fewest any of its choices
/// found (what was reused for every one of them).
pub fn totals(prompt_lens: &[usize], per_choice: &[(usize, Usage, usize)]) -> Totals {
    let mut t = Totals {
        prompt: prompt_lens.iter().sum(),
        ..Totals::default()
    };
    let mut cached: Vec<Option<usize>> = vec![None; prompt_lens.len()];
    for &(prompt_index, u, completion) in per_choice {
        t.completion += completion;
        if let Some(c) = cached.get_mut(prompt_index) {
            *c = Some(c.map_or(u.cached_tokens, |old: usize| old.min(u.cached_tokens)));
        }
    }
    t.cached = cached.into_iter().flatten().sum();
    t
}

/// JSON cannot hold -inf (a masked token's log-probability): a large
/// negative number stands for it, as other servers do.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() {
        lp
    } else {
        -9999.0
    }
}

fn token_string(tok: &Tokenizer, id: u32) -> String {
    tok.token_text(id).unwrap_or_default()
}

fn chat_entry(tok: &Tokenizer, id: u32, lp: f32) -> Value {
    let text = token_string(tok, id);
    let bytes: Vec<u8> = text.as_bytes().to_vec();
    json!({ "token": text, "logprob": finite(lp), "bytes": bytes })
}

/// `logprobs` of a chat choice: `{"content": [...]}`.
pub fn chat_logprobs(tok: &Tokenizer, tokens: &[TokenOut]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = chat_entry(tok, t.id, t.logprob.unwrap_or(0.0));
            let top: Vec<Value> = t.top.iter().map(|&(id, lp)| chat_entry(tok, id, lp)).collect();
            e["top_logprobs"] = Value::Array(top);
            e
        })
        .collect();
    json!({ "content": content })
}

/// `logprobs` of a completion choice (the legacy parallel-lists shape);
/// `offset` is where the first token's text starts in the choice's text.
pub fn completion_logprobs(tok: &Tokenizer, tokens: &[TokenOut], mut offset: usize) -> Value {
    let mut texts = Vec::with_capacity(tokens.len());
    let mut lps = Vec::with_capacity(tokens.len());
    let mut tops = Vec::with_capacity(tokens.len());
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        let text = token_string(tok, t.id);
        offsets.push(offset);
        offset += text.chars().count();
        texts.push(text);
        lps.push(finite(t.logprob.unwrap_or(0.0)));
        let top: serde_json::Map<String, Value> = t
            .top
            .iter()
            .map(|&(id, lp)| (token_string(tok, id), json!(finite(lp))))
            .collect();
        tops.push(Value::Object(top));
    }
    json!({
        "tokens": texts,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    })
}

/// Header fields of every response and chunk.
#[derive(Clone, Debug)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Header {
    pub fn object(&self, object: &str, choices: Vec<Value>) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }
}
