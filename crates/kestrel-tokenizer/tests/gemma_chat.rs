//! The default model has no chat template in its GGUF: the built-in Gemma
//! format is used.

mod common;

use common::gemma;
use kestrel_tokenizer::{ChatMessage, ChatTemplateSource};

#[test]
fn gemma_turn_format_for_a_full_conversation() {
    let tok = gemma();
    assert_eq!(
        tok.chat_template_source(),
        ChatTemplateSource::BuiltIn("gemma".into())
    );
    let messages = [
        ChatMessage::system("You are a terse assistant."),
        ChatMessage::user("What is the capital of France?"),
        ChatMessage::assistant("Paris."),
        ChatMessage::user("And of Italy?"),
    ];
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<bos><start_of_turn>user\nYou are a terse assistant.\n\nWhat is the capital of France?<end_of_turn>\n\
         <start_of_turn>model\nParis.<end_of_turn>\n\
         <start_of_turn>user\nAnd of Italy?<end_of_turn>\n\
         <start_of_turn>model\n"
    );

    let ids = tok.encode_chat_prompt(&prompt).unwrap();
    assert_eq!(&ids[..3], &[2, 105, 2364], "<bos><start_of_turn>user");
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 1, "one BOS");
    assert_eq!(ids.iter().filter(|&&id| id == 105).count(), 4);
    assert_eq!(ids.iter().filter(|&&id| id == 106).count(), 3);
    assert_eq!(
        &ids[ids.len() - 3..],
        &[105, 4368, 107],
        "<start_of_turn>model\\n"
    );
    assert_eq!(tok.decode_with_special(&ids).unwrap(), prompt);
}

#[test]
fn gemma_prompt_without_generation_prompt() {
    let tok = gemma();
    let prompt = tok
        .apply_chat_template(&[ChatMessage::user("Hi")], false)
        .unwrap();
    assert_eq!(prompt, "<bos><start_of_turn>user\nHi<end_of_turn>\n");
    assert_eq!(
        tok.encode_chat_prompt(&prompt).unwrap(),
        vec![2, 105, 2364, 107, 10979, 106, 107]
    );
}
