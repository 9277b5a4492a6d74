//! Request bodies of the OpenAI endpoints. Every field is optional where
//! OpenAI allows `null`; unknown fields are ignored (clients send many), but
//! a known field of the wrong type is a 400.

use serde::Deserialize;

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            StopField::One(s) => vec![s],
            StopField::Many(v) => v,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// Sampling and streaming fields shared by both completion endpoints.
/// Integers that must not be negative are read as `i64` so a negative value
/// gets a range error naming the field rather than a bare type error.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// 0 or -1 (vLLM's convention) disable it.
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
}

/// Message content: a string, or a list of parts of which only text is
/// understood (this server serves text-only models).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    /// `null` is allowed (e.g. an assistant turn that only called tools).
    pub content: Option<Content>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub messages: Vec<MessageIn>,
    /// The newer name of `max_tokens`; wins when both are given.
    pub max_completion_tokens: Option<i64>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
}

/// `prompt` of /v1/completions: text, texts, token ids, or lists of ids.
/// Each prompt of a list gets its own `n` choices.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: PromptField,
    pub echo: Option<bool>,
    /// Number of top log-probabilities per token (0 = only the chosen one).
    pub logprobs: Option<i64>,
}

/// POST /tokenize: either `prompt` (raw text) or `messages` (chat template).
#[derive(Clone, Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<MessageIn>>,
    /// Add BOS to a raw prompt (default: what the model's tokenizer does).
    pub add_special_tokens: Option<bool>,
    /// With `messages`: end with the assistant turn's opening (default true).
    pub add_generation_prompt: Option<bool>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<i64>,
}
