//! Chat templates: the Jinja template shipped with a model (GGUF
//! `tokenizer.chat_template`, tokenizer_config.json `chat_template`, or
//! chat_template.jinja), rendered with minijinja the way Hugging Face
//! transformers renders it; or, when the file has none, a built-in format
//! chosen from the architecture and the vocabulary.

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::vocab::Vocab;
use crate::TokenizerError;

/// One turn of a conversation. Roles are "system", "user", "assistant"
/// (templates may accept others, e.g. "tool").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage::new("assistant", content)
    }
}

/// Where the chat template in use came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChatTemplateSource {
    /// The model file or directory ships a Jinja template.
    FromFile,
    /// No template in the file; kestrel's built-in format of this name
    /// ("gemma", "llama3" or "chatml") is used.
    BuiltIn(String),
    /// No template and no built-in fits: chat formatting is unavailable.
    None,
}

/// Formats kestrel knows without a template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BuiltIn {
    /// `<start_of_turn>user\n...<end_of_turn>\n`, assistant role "model",
    /// system text prepended to the first user turn.
    Gemma,
    /// `<|start_header_id|>role<|end_header_id|>\n\n...<|eot_id|>`.
    Llama3,
    /// `<|im_start|>role\n...<|im_end|>\n` (Qwen and many others).
    ChatMl,
}

impl BuiltIn {
    fn name(self) -> &'static str {
        match self {
            BuiltIn::Gemma => "gemma",
            BuiltIn::Llama3 => "llama3",
            BuiltIn::ChatMl => "chatml",
        }
    }

    /// Picks a built-in for a model without a template: Gemma by
    /// architecture name, the others only when the vocabulary has the
    /// tokens their format needs (architecture "llama" covers Llama 2 too).
    pub(crate) fn choose(architecture: Option<&str>, vocab: &Vocab) -> Option<BuiltIn> {
        let has = |t: &str| vocab.lookup(t).is_some();
        let arch = architecture.unwrap_or("").to_ascii_lowercase();
        if arch.starts_with("gemma") || has("<start_of_turn>") && has("<end_of_turn>") {
            Some(BuiltIn::Gemma)
        } else if has("<|start_header_id|>") && has("<|end_header_id|>") && has("<|eot_id|>") {
            Some(BuiltIn::Llama3)
        } else if has("<|im_start|>") && has("<|im_end|>") {
            Some(BuiltIn::ChatMl)
        } else {
            None
        }
    }

    fn render(
        self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos: &str,
    ) -> Result<String, TokenizerError> {
        let mut out =
            String::with_capacity(64 + messages.iter().map(|m| m.content.len() + 32).sum::<usize>());
        match self {
            BuiltIn::Gemma => render_gemma(messages, add_generation_prompt, bos, &mut out)?,
            BuiltIn::Llama3 => {
                out.push_str(bos);
                for m in messages {
                    out.push_str("<|start_header_id|>");
                    out.push_str(&m.role);
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(m.content.trim());
                    out.push_str("<|eot_id|>");
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
            BuiltIn::ChatMl => {
                for m in messages {
                    out.push_str("<|im_start|>");
                    out.push_str(&m.role);
                    out.push('\n');
                    out.push_str(&m.content);
                    out.push_str("<|im_end|>\n");
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
        }
        Ok(out)
    }
}

/// Gemma's turn format, with the rules of Google's template: a leading
/// system message becomes a prefix of the first user turn, turns must
/// alternate user / non-user, the assistant is called "model" and contents
/// are trimmed. One deliberate difference: a system message with no user
/// turn after it is emitted as a user turn instead of being dropped.
fn render_gemma(
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos: &str,
    out: &mut String,
) -> Result<(), TokenizerError> {
    out.push_str(bos);
    let (system, turns) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
        _ => (None, messages),
    };
    if turns.is_empty() {
        if let Some(system) = system {
            out.push_str("<start_of_turn>user\n");
            out.push_str(system.trim());
            out.push_str("<end_of_turn>\n");
        }
    }
    for (i, m) in turns.iter().enumerate() {
        if (m.role == "user") != (i % 2 == 0) {
            return Err(TokenizerError::ChatTemplate {
                origin: "built-in gemma".into(),
                message: format!(
                    "conversation roles must alternate user/assistant/user/assistant/... \
                     (after an optional leading system message); message {} has role '{}'",
                    i + usize::from(system.is_some()),
                    m.role
                ),
            });
        }
        let role = if m.role == "assistant" { "model" } else { &m.role };
        out.push_str("<start_of_turn>");
        out.push_str(role);
        out.push('\n');
        if i == 0 {
            if let Some(system) = system {
                out.push_str(system);
                out.push_str("\n\n");
            }
        }
        out.push_str(m.content.trim());
        out.push_str("<end_of_turn>\n");
    }
    if add_generation_prompt {
        out.push_str("<start_of_turn>model\n");
    }
    Ok(())
}

/// The template a tokenizer renders conversations with.
#[derive(Debug)]
pub(crate) enum ChatTemplate {
    /// A compiled Jinja template from the model files.
    Jinja {
        env: Box<Environment<'static>>,
        source: String,
        origin: String,
    },
    /// The model's template does not compile; the message says why (kept
    /// so that loading still succeeds for plain completion).
    Broken {
        origin: String,
        message: String,
    },
    BuiltIn(BuiltIn),
    None,
}

const TEMPLATE_NAME: &str = "chat";

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source` with the settings transformers uses (trim_blocks,
    /// lstrip_blocks, Python string methods, `raise_exception`).
    /// `origin` says where it came from, for error messages.
    pub(crate) fn from_jinja(source: String, origin: String) -> ChatTemplate {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        match env.add_template_owned(TEMPLATE_NAME, source.clone()) {
            Ok(()) => ChatTemplate::Jinja {
                env: Box::new(env),
                source,
                origin,
            },
            Err(e) => ChatTemplate::Broken {
                origin,
                message: format!("does not compile: {e:#}"),
            },
        }
    }

    pub(crate) fn source(&self) -> ChatTemplateSource {
        match self {
            ChatTemplate::Jinja { .. } | ChatTemplate::Broken { .. } => ChatTemplateSource::FromFile,
            ChatTemplate::BuiltIn(b) => ChatTemplateSource::BuiltIn(b.name().to_owned()),
            ChatTemplate::None => ChatTemplateSource::None,
        }
    }

    /// The Jinja source, if the template came from the model files.
    pub(crate) fn jinja_source(&self) -> Option<&str> {
        match self {
            ChatTemplate::Jinja { source, .. } => Some(source),
            _ => None,
        }
    }

    pub(crate) fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String, TokenizerError> {
        match self {
            ChatTemplate::Jinja { env, origin, .. } => {
                let fail = |e: JinjaError| TokenizerError::ChatTemplate {
                    origin: origin.clone(),
                    message: format!("{e:#}"),
                };
                let template = env.get_template(TEMPLATE_NAME).map_err(fail)?;
                // transformers passes tools/documents as None when unused;
                // templates test `tools is not none`, so they must be
                // defined.
                template
                    .render(context! {
                        messages => messages,
                        add_generation_prompt => add_generation_prompt,
                        bos_token => bos,
                        eos_token => eos,
                        tools => (),
                        documents => (),
                    })
                    .map_err(fail)
            }
            ChatTemplate::Broken { origin, message } => Err(TokenizerError::ChatTemplate {
                origin: origin.clone(),
                message: message.clone(),
            }),
            ChatTemplate::BuiltIn(b) => b.render(messages, add_generation_prompt, bos),
            ChatTemplate::None => Err(TokenizerError::ChatTemplate {
                origin: "none".into(),
                message: "the model has no chat template and no built-in format fits its \
                          vocabulary; format the prompt yourself"
                    .into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convo() -> Vec<ChatMessage> {
        vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user(" Hi! "),
            ChatMessage::assistant("Hello."),
            ChatMessage::user("Bye"),
        ]
    }

    #[test]
    fn gemma_builtin_format() {
        let s = BuiltIn::Gemma.render(&convo(), true, "<bos>").unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n\
             <start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let no_prompt = BuiltIn::Gemma.render(&convo()[1..2], false, "<bos>").unwrap();
        assert_eq!(no_prompt, "<bos><start_of_turn>user\nHi!<end_of_turn>\n");
    }

    #[test]
    fn gemma_rejects_non_alternating_roles() {
        let msgs = [ChatMessage::user("a"), ChatMessage::user("b")];
        let err = BuiltIn::Gemma.render(&msgs, true, "<bos>").unwrap_err();
        assert!(err.to_string().contains("alternate"), "{err}");
        assert!(err.to_string().contains("message 1"), "{err}");
    }

    #[test]
    fn gemma_keeps_a_lone_system_message() {
        let s = BuiltIn::Gemma
            .render(&[ChatMessage::system("S")], true, "<bos>")
            .unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn llama3_and_chatml_builtins() {
        let msgs = [ChatMessage::system("S"), ChatMessage::user("U")];
        assert_eq!(
            BuiltIn::Llama3.render(&msgs, true, "<|begin_of_text|>").unwrap(),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        assert_eq!(
            BuiltIn::ChatMl.render(&msgs, true, "").unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn jinja_uses_python_methods_and_raise_exception() {
        let t = ChatTemplate::from_jinja(
            "{% for m in messages %}{% if m.role.startswith('sys') %}[{{ m.content.strip() }}]\
             {% else %}{{ m.role.upper() }}:{{ m.content }};{% endif %}{% endfor %}\
             {% if tools is not none %}{{ raise_exception('tools given') }}{% endif %}\
             {{ eos_token }}"
                .into(),
            "test".into(),
        );
        let s = t
            .render(
                &[ChatMessage::system("  x "), ChatMessage::user("y")],
                false,
                "<s>",
                "</s>",
            )
            .unwrap();
        assert_eq!(s, "[x]USER:y;</s>");
        let fails = ChatTemplate::from_jinja("{{ raise_exception('nope') }}".into(), "t".into());
        let err = fails.render(&[], false, "", "").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn broken_template_errors_at_render_time() {
        let t = ChatTemplate::from_jinja("{% for %}".into(), "tokenizer_config.json".into());
        assert_eq!(t.source(), ChatTemplateSource::FromFile);
        let err = t.render(&[], true, "", "").unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }
}
