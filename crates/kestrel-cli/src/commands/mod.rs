//! One module per subcommand.

pub mod bench;
pub mod bench_detok;
pub mod bench_engine;
pub mod bench_serve;
pub mod chat;
pub mod inspect;
pub mod long_prefill_args;
pub mod microbench;
pub mod perplexity;
pub mod report;
pub mod run;
pub mod sampling_args;
pub mod serve;
pub mod speculation_args;
pub mod tokenize;
pub mod validate;
