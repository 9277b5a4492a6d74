//! Response bodies and stream chunks in OpenAI's JSON shapes.

use kestrel_engine::{FinishReason, PromptLogprob, Usage};
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

/// Characters `id` adds to decoded text: none for control tokens (BOS,
/// EOS, ...), and a byte token that starts a multi-byte character counts
/// for the whole character while its continuation bytes count for none.
fn printed_chars(tok: &Tokenizer, id: u32) -> usize {
    if tok.is_control(id) {
        return 0;
    }
    let bytes = tok.token_bytes(id).unwrap_or_default();
    // UTF-8 continuation bytes are 0b10xx_xxxx; every other byte starts a character.
    bytes.iter().filter(|&&b| b & 0xC0 != 0x80).count()
}

/// The echoed prompt of a completion choice with its scores: `scores[i]`
/// is the score of `ids[i + 1]` (the first token has none).
#[derive(Clone, Copy, Debug)]
pub struct EchoedPrompt<'a> {
    /// The text echoed at the start of the choice's text.
    pub text: &'a str,
    pub ids: &'a [u32],
    pub scores: &'a [PromptLogprob],
}

/// The legacy parallel lists, filled token by token.
struct LegacyLists {
    tokens: Vec<String>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<usize>,
    offset: usize,
}

impl LegacyLists {
    fn push(&mut self, tok: &Tokenizer, id: u32, scored: Option<(f32, &[(u32, f32)])>) {
        self.tokens.push(token_string(tok, id));
        self.text_offset.push(self.offset);
        self.offset += printed_chars(tok, id);
        match scored {
            Some((lp, top)) => {
                self.token_logprobs.push(json!(finite(lp)));
                let top: serde_json::Map<String, Value> = top
                    .iter()
                    .map(|&(id, lp)| (token_string(tok, id), json!(finite(lp))))
                    .collect();
                self.top_logprobs.push(Value::Object(top));
            }
            None => {
                self.token_logprobs.push(Value::Null);
                self.top_logprobs.push(Value::Null);
            }
        }
    }
}

/// `logprobs` of a completion choice (the legacy parallel-lists shape):
/// the echoed prompt's tokens first when there is one (the first with
/// `null` log-probability and alternatives, as OpenAI's API gives it),
/// then the generated `tokens`. `offset` is where the first listed token's
/// text starts in the choice's text; each `text_offset` counts the
/// characters the tokens before it add to the text.
pub fn completion_logprobs(
    tok: &Tokenizer,
    echo: Option<EchoedPrompt<'_>>,
    tokens: &[TokenOut],
    offset: usize,
) -> Value {
    let n = echo.map_or(0, |e| e.ids.len()) + tokens.len();
    let mut l = LegacyLists {
        tokens: Vec::with_capacity(n),
        token_logprobs: Vec::with_capacity(n),
        top_logprobs: Vec::with_capacity(n),
        text_offset: Vec::with_capacity(n),
        offset,
    };
    if let Some(e) = echo {
        for (i, &id) in e.ids.iter().enumerate() {
            let scored = i
                .checked_sub(1)
                .and_then(|j| e.scores.get(j))
                .map(|s| (s.logprob, s.top_logprobs.as_slice()));
            l.push(tok, id, scored);
        }
        // The generated text starts right after the echoed text.
        l.offset = offset + e.text.chars().count();
    }
    for t in tokens {
        l.push(tok, t.id, Some((t.logprob.unwrap_or(0.0), t.top.as_slice())));
    }
    json!({
        "tokens": l.tokens,
        "token_logprobs": l.token_logprobs,
        "top_logprobs": l.top_logprobs,
        "text_offset": l.text_offset,
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
