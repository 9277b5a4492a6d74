//! What the load generator needs from one streamed JSON chunk: how much
//! generated text it carries, the usage totals when present, and whether it
//! is an error object.
//!
//! This runs once per streamed token, so it deserialises only those fields
//! and measures text without copying it: field names and skipped values are
//! matched on borrowed input, and a string with escapes is measured in
//! serde_json's scratch buffer. No allocation per chunk.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

/// Token counts of a `usage` object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: Option<u64>,
    #[serde(default)]
    pub completion_tokens: Option<u64>,
}

/// The parts of one chunk that the measurements use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// Bytes of generated text over all choices (0: a role-only, finish-only
    /// or usage-only chunk, which is not a token).
    pub content_bytes: usize,
    pub usage: Option<Usage>,
    /// The chunk is an `{"error": ...}` object (the stream broke server-side).
    pub error: bool,
}

/// The length of a JSON string, without keeping it.
struct TextLen(usize);

impl<'de> Deserialize<'de> for TextLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TextLen, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = TextLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<TextLen, E> {
                Ok(TextLen(s.len()))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<TextLen>,
    /// Reasoning models (vLLM) stream their thinking here before `content`.
    #[serde(default)]
    reasoning_content: Option<TextLen>,
}

#[derive(Deserialize)]
struct Choice {
    /// /v1/completions
    #[serde(default)]
    text: Option<TextLen>,
    /// /v1/chat/completions
    #[serde(default)]
    delta: Option<Delta>,
}

impl Choice {
    fn content_bytes(&self) -> usize {
        let text = self.text.as_ref().map_or(0, |t| t.0);
        let delta = self.delta.as_ref().map_or(0, |d| {
            d.content.as_ref().map_or(0, |t| t.0) + d.reasoning_content.as_ref().map_or(0, |t| t.0)
        });
        text + delta
    }
}

/// The summed content length of a `choices` array, visited in place (no Vec).
struct ChoicesLen(usize);

impl<'de> Deserialize<'de> for ChoicesLen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChoicesLen, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChoicesLen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ChoicesLen, A::Error> {
                let mut n = 0;
                while let Some(c) = seq.next_element::<Choice>()? {
                    n += c.content_bytes();
                }
                Ok(ChoicesLen(n))
            }
        }
        d.deserialize_seq(V)
    }
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    choices: Option<ChoicesLen>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<IgnoredAny>,
}

/// Reads one event's data (a JSON object).
pub fn parse(data: &[u8]) -> Result<ChunkInfo, serde_json::Error> {
    let raw: RawChunk = serde_json::from_slice(data)?;
    Ok(ChunkInfo {
        content_bytes: raw.choices.map_or(0, |c| c.0),
        usage: raw.usage,
        error: raw.error.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_chat_usage_and_error_chunks() {
        let c = parse(br#"{"id":"x","choices":[{"index":0,"text":" hi\n","logprobs":null,"finish_reason":null}],"usage":null}"#)
            .unwrap();
        assert_eq!((c.content_bytes, c.usage, c.error), (4, None, false));
        let role = parse(br#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#).unwrap();
        assert_eq!(role.content_bytes, 0);
        let chat = parse(br#"{"choices":[{"index":0,"delta":{"content":"\u00e9t\u00e9"}}]}"#).unwrap();
        assert_eq!(chat.content_bytes, "été".len());
        let usage =
            parse(br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":8,"total_tokens":20}}"#)
                .unwrap();
        assert_eq!(
            usage.usage,
            Some(Usage {
                prompt_tokens: Some(12),
                completion_tokens: Some(8)
            })
        );
        assert!(parse(br#"{"error":{"message":"boom"}}"#).unwrap().error);
        assert!(!parse(br#"{"error":null,"choices":[]}"#).unwrap().error);
        assert!(parse(b"{not json").is_err());
    }
}
