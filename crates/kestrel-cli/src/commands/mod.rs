//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod inspect;
pub mod run;
pub mod report;
pub mod sampling_args;
pub mod serve;
pub mod tokenize;
